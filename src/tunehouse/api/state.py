"""Everything a running server holds, built once by create_app (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunehouse.config import Settings
from tunehouse.store.blobs import Blobs, open_blobs
from tunehouse.store.engine import Database, migrate


@dataclass
class AppState:
    settings: Settings
    db: Database
    files: Blobs
    weights: Blobs
    _engine: Any = field(default=None, repr=False)  # the inference engine, created on first chat

    @classmethod
    def open(cls, settings: Settings) -> AppState:
        settings.ensure_dirs()
        migrate(settings.db_url)
        return cls(
            settings=settings,
            db=Database(settings.db_url),
            files=open_blobs(settings, "files"),
            weights=open_blobs(settings, "weights"),
        )

    @property
    def inference(self):
        if self._engine is None:
            # Imported here, on the first chat request: torch and transformers are not loaded
            # before this server serves a model (an allowed deferred import, see pyproject.toml).
            from tunehouse.inference.hf import HFEngine

            self._engine = HFEngine.from_settings(self.settings)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self.db.dispose()
