#!/usr/bin/env python3
"""Generate the support-ticket triage example dataset (stdlib only, deterministic).

Each example is one OpenAI chat-format line:

    system:    "Classify the support ticket."
    user:      a short customer message
    assistant: {"category": "<category>", "priority": "<priority>"}

category ∈ billing, login, shipping, bug, feature_request
priority ∈ low, normal, high — set by clear cues in the text:
    high:   urgency / loss of access ("urgent", "asap", "can't access", "immediately", ...)
    low:    explicit lack of urgency ("no rush", "whenever you get a chance", "minor", ...)
    normal: neither

Held-out prompts use issue templates that never appear in train or valid (one per category), so
they test generalisation to new phrasings, not memorisation.

Usage:  python examples/generate_tickets.py [--out-dir examples]
Writes tickets_train.jsonl, tickets_valid.jsonl and tickets_heldout.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
SYSTEM = "Classify the support ticket."
CATEGORIES = ["billing", "login", "shipping", "bug", "feature_request"]
PRIORITIES = ["low", "normal", "high"]

N_TRAIN_PER_CELL = 6  # per (category, priority): 5 × 3 × 6 = 90 training examples
N_VALID_PER_CELL = 1  # 15 validation examples
N_HELDOUT_PER_CELL = 1  # 15 held-out prompts, from held-out issue templates

# Slot values shared by the templates ({name} placeholders).
SLOTS = {
    "amount": ["$12.99", "$49", "$120", "€30", "$9.99", "£75", "$240"],
    "plan": ["Pro", "Team", "Basic", "Premium", "Business"],
    "month": ["March", "April", "last month", "this month", "January", "October"],
    "order": ["#48213", "#10977", "#55302", "#73410", "#20488", "#91625"],
    "item": [
        "a wireless headset",
        "the desk lamp",
        "a pair of boots",
        "a blender",
        "the phone case",
        "a backpack",
    ],
    "days": ["two weeks", "ten days", "a week", "three weeks", "5 days"],
    "carrier": ["UPS", "FedEx", "DHL", "the courier", "USPS"],
    "page": ["settings page", "dashboard", "checkout page", "reports tab", "profile page", "search page"],
    "device": [
        "my iPhone",
        "my Android phone",
        "Chrome on Windows",
        "Safari on my Mac",
        "the desktop app",
        "Firefox",
    ],
    "action": [
        "click Save",
        "upload a file",
        "export to CSV",
        "open a report",
        "change my avatar",
        "filter by date",
    ],
    "feature": [
        "dark mode",
        "a CSV export for invoices",
        "keyboard shortcuts",
        "a calendar view",
        "two-way Slack integration",
        "bulk editing",
        "custom email templates",
        "an API for reports",
    ],
    "email": ["my work email", "my Gmail address", "the email on file", "my old email"],
}

# Issue templates per category: the first N are used for train/valid, the last one only for
# held-out prompts.
ISSUES = {
    "billing": [
        "I was charged {amount} twice for my {plan} subscription in {month}.",
        "My invoice for {month} shows {amount} but I'm on the {plan} plan, that's wrong.",
        "I cancelled my {plan} plan but you still billed my card {amount}.",
        "Can I get a refund of {amount}? I was billed after my trial ended.",
        "The payment of {amount} went through but my account still says unpaid.",
        "Why did my {plan} subscription price go up to {amount} in {month}?",
        "I need to update the credit card you charge for the {plan} plan, the old one expired.",
        # held-out
        "There's an unexpected {amount} fee on my statement from {month} that I don't recognize.",
    ],
    "login": [
        "I can't log in, it says my password is incorrect even after resetting it.",
        "The password reset email never arrives at {email}.",
        "My two-factor code is always rejected when I sign in on {device}.",
        "I'm locked out of my account after too many login attempts.",
        "Sign in just loops back to the login screen on {device}.",
        "I changed {email} and now I can't sign in with either address.",
        "The magic login link says it has expired every time I click it.",
        # held-out
        "After the update my saved password stopped working and single sign-on shows an error on {device}.",
    ],
    "shipping": [
        "My order {order} hasn't arrived and it's been {days}.",
        "Tracking for order {order} hasn't updated in {days}, {carrier} says nothing.",
        "I received the wrong item in order {order}, I ordered {item}.",
        "{carrier} marked order {order} as delivered but nothing came.",
        "Can I change the delivery address for order {order}? I moved.",
        "My package with {item} arrived damaged, the box was crushed.",
        "Order {order} was supposed to ship {days} ago and still shows processing.",
        # held-out
        "Only half of order {order} came, {item} is missing from the parcel {carrier} left.",
    ],
    "bug": [
        "The {page} crashes whenever I {action}.",
        "When I {action} on the {page} I get a blank white screen.",
        "The app freezes on {device} every time I {action}.",
        "Numbers on the {page} are wrong, totals don't add up.",
        "I get 'Error 500' on the {page} since yesterday's update.",
        "The {page} takes forever to load and then shows an error on {device}.",
        "Trying to {action} does nothing, the button just spins.",
        # held-out
        "Every time I {action} in the desktop app, the {page} shows duplicated rows and then closes.",
    ],
    "feature_request": [
        "It would be great if you added {feature}.",
        "Could you please support {feature}? We'd use it every day.",
        "Any plans to add {feature}? Our team keeps asking for it.",
        "Feature idea: {feature} on the {page}.",
        "I'd love to see {feature} in a future release.",
        "Please consider building {feature}, other tools already have it.",
        "Suggestion: let us have {feature} so we don't need a workaround.",
        # held-out
        "Would your roadmap ever include {feature}? It would save my team hours.",
    ],
}

# Priority cues. High: urgency or loss of access/money. Low: explicit lack of urgency.
# The last cue of each list is reserved for held-out prompts.
CUES = {
    "high": [
        ("URGENT: ", ""),
        ("", " This is urgent, please fix it asap."),
        ("", " I can't access anything and need this solved immediately."),
        ("Urgent! ", " We're losing money every hour."),
        ("", " Please help ASAP, my whole team is blocked."),
        ("", " This is critical, I need it resolved today."),
        # held-out
        ("Emergency: ", " We need this fixed right away."),
    ],
    "normal": [
        ("", ""),
        ("", " Can you look into it?"),
        ("", " Thanks for checking."),
        ("", " Please let me know what to do."),
        ("Hello, ", ""),
        ("", " What should I do?"),
        # held-out
        ("", " Could someone take a look?"),
    ],
    "low": [
        ("", " No rush, whenever you get a chance."),
        ("", " Not urgent at all, just letting you know."),
        ("Low priority: ", ""),
        ("", " Minor thing, no hurry."),
        ("Just a small note: ", " No rush."),
        ("", " It can wait, nothing is blocked."),
        # held-out
        ("", " Not a big deal, take your time."),
    ],
}

GREETINGS = ["", "", "", "Hi, ", "Hi team, ", "Hello, ", "Hey, "]
SIGNOFFS = ["", "", "", " Thanks.", " Thank you!", " Regards, Sam.", " Cheers."]


def fill(template: str, rng: random.Random) -> str:
    out = template
    for name, values in SLOTS.items():
        key = "{" + name + "}"
        while key in out:
            out = out.replace(key, rng.choice(values), 1)
    return out


def compose(issue: str, cue: tuple[str, str], rng: random.Random) -> str:
    prefix, suffix = cue
    greeting = "" if prefix else rng.choice(GREETINGS)  # "Hi, URGENT: ..." reads badly
    text = greeting + prefix + issue + suffix
    if not suffix:
        text += rng.choice(SIGNOFFS)
    # After a greeting ("Hi, "), lower-case the first letter of the issue unless it is "I".
    start = len(greeting + prefix)
    if text[:start].endswith(", ") and not (text[start] == "I" and text[start + 1 : start + 2] in (" ", "'")):
        text = text[:start] + text[start].lower() + text[start + 1 :]
    return text


def answer(category: str, priority: str) -> str:
    return json.dumps({"category": category, "priority": priority})


def example(user: str, category: str, priority: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer(category, priority)},
        ]
    }


def generate(seed: int = SEED) -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(seed)
    train, valid, heldout = [], [], []
    seen: set[str] = set()

    def draw(issues: list[str], cues: list[tuple[str, str]], category: str, priority: str) -> dict:
        for _ in range(1000):
            text = compose(fill(rng.choice(issues), rng), rng.choice(cues), rng)
            if text not in seen:
                seen.add(text)
                return example(text, category, priority)
        raise RuntimeError("could not draw a new unique ticket")

    for category in CATEGORIES:
        seen_issues, heldout_issues = ISSUES[category][:-1], ISSUES[category][-1:]
        for priority in PRIORITIES:
            seen_cues, heldout_cues = CUES[priority][:-1], CUES[priority][-1:]
            # Held-out: a new issue phrasing, and alternately a new or a known priority cue.
            for i in range(N_HELDOUT_PER_CELL):
                cues = heldout_cues if (CATEGORIES.index(category) + i) % 2 == 0 else seen_cues
                heldout.append(draw(heldout_issues, cues, category, priority))
            for _ in range(N_VALID_PER_CELL):
                valid.append(draw(seen_issues, seen_cues, category, priority))
            for _ in range(N_TRAIN_PER_CELL):
                train.append(draw(seen_issues, seen_cues, category, priority))

    rng.shuffle(train)
    rng.shuffle(valid)
    rng.shuffle(heldout)
    return train, valid, heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    train, valid, heldout = generate(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid), ("heldout", heldout)):
        path = args.out_dir / f"tickets_{name}.jsonl"
        write_jsonl(path, rows)
        print(f"wrote {len(rows):3d} examples to {path}")


if __name__ == "__main__":
    main()
