from tunehouse.cli.main import app

app()
