"""Synthetic tasks that a small model cannot do from a prompt but learns from examples.

Deterministic generators (a seed gives the same file, byte for byte) for the
bundled demo and the examples:

- ``ticket-codes``: route a support ticket to an invented internal code
  (``ZX-17``...): an 8-class code book that only examples can teach.
- ``bank-intents``: classify a banking customer message into one of 12 intents.
- ``order-extraction``: extract the fields of an order message into the house JSON schema.

Each record is OpenAI chat JSONL: the task's instructions as the system prompt,
the input as the user turn, the expected answer as the assistant turn.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunesmith.atomic import atomic_file

FILLERS: dict[str, list[str]] = {
    "product": ["the Pro plan", "the family plan", "my headphones", "the desk lamp", "the blender", "a phone case",
                "the starter kit", "the coffee grinder", "my new kettle", "the yoga mat", "the backpack"],
    "amount": ["$12.99", "$49", "$120", "$8.50", "$230", "$19.99", "$75", "€40", "£15"],
    "month": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"],
    "days": ["two", "three", "five", "six", "ten", "twelve"],
    "device": ["iPhone", "Android phone", "iPad", "laptop", "Chromebook", "tablet"],
    "feature": ["dark mode", "a CSV export", "shared lists", "a weekly summary email", "offline mode",
                "calendar sync", "bulk editing", "a Spanish translation"],
    "order": ["#4471", "#88213", "#5530", "#10094", "#7302", "#66120", "#2389"],
    "city": ["Lyon", "Denver", "Osaka", "Leeds", "Porto", "Austin", "Gdansk", "Perth", "Quito", "Bergen"],
    "greeting": ["", "", "Hi! ", "Hello. ", "Hey team. ", "Good morning. "],
    "closing": ["", "", " Thanks.", " Please help.", " Thank you!", " Any update?"],
}


def _fill(template: str, rng: random.Random) -> str:
    text = template
    for slot, choices in FILLERS.items():
        while "{" + slot + "}" in text:
            text = text.replace("{" + slot + "}", rng.choice(choices), 1)
    return text


@dataclass(frozen=True)
class Intent:
    """One class: its label, what it means (for the instructions) and phrasings of it."""

    label: str
    meaning: str
    templates: tuple[str, ...]


TICKET_CODES = (
    Intent("ZX-17", "payments, charges, refunds and invoices", (
        "I was charged twice for {product} in {month}.", "Where is my refund of {amount}?",
        "My invoice for {month} shows {amount} but I expected less.", "Why did my card get billed {amount}?",
        "The payment for {product} failed but money left my account.", "Please send a corrected invoice for {month}.")),
    Intent("QM-04", "signing in, passwords and two-factor codes", (
        "I can't log in on my {device}.", "The password reset email never arrives.",
        "My account is locked after too many attempts.", "The two-factor code on my {device} is always rejected.",
        "I forgot which email I used to sign up.", "Login says my password is wrong but it is not.")),
    Intent("LP-33", "deliveries that are late or lost", (
        "Order {order} still has not arrived after {days} days.", "Tracking for {order} has not moved since {month}.",
        "The courier says delivered but nothing came to my door.", "When will {product} finally ship?",
        "My parcel to {city} seems lost.", "Order {order} is stuck in customs.")),
    Intent("RV-52", "items that arrived broken or wrong", (
        "{product} arrived cracked.", "The box for order {order} was crushed and {product} is broken.",
        "I received the wrong colour of {product}.", "{product} stopped working after {days} days.",
        "Parts are missing from order {order}.", "You sent me someone else's item instead of {product}.")),
    Intent("HT-29", "cancelling or pausing a subscription", (
        "Please cancel my subscription to {product}.", "How do I stop the monthly renewal?",
        "I want to pause my plan until {month}.", "Cancel my account at the end of {month}.",
        "Don't renew {product} next month.", "I'd like to end my membership.")),
    Intent("KD-61", "the app crashing or misbehaving", (
        "The app crashes when I open it on my {device}.", "The screen goes blank after the update.",
        "Search returns nothing since {month}.", "The app freezes every time I upload a photo on my {device}.",
        "Notifications stopped working on my {device}.", "I get an error 500 when saving.")),
    Intent("WB-08", "ideas and requests for new features", (
        "Could you add {feature}?", "It would be great to have {feature}.",
        "Please consider {feature} for the next release.", "Any plans to support {feature}?",
        "My team would pay more for {feature}.", "Suggestion: {feature} would save me time.")),
    Intent("FN-45", "personal data, privacy and account deletion", (
        "Please delete all my personal data.", "What data do you keep about me?",
        "I want a copy of everything you store on me.", "Remove my phone number from your records.",
        "Do you share my data with advertisers?", "Erase my account and my history permanently.")),
)

BANK_INTENTS = (
    Intent("card_lost", "a card that is lost or stolen", (
        "I lost my debit card in {city}.", "My card was stolen yesterday, block it please.",
        "I can't find my credit card anywhere.", "Someone took my wallet with my card in {city}.")),
    Intent("card_declined", "a card payment that was declined", (
        "My card got declined at the shop for {amount}.", "Why was my payment of {amount} refused?",
        "The terminal keeps saying card declined.", "Online checkout rejects my card.")),
    Intent("transfer_pending", "a transfer that has not arrived", (
        "My transfer of {amount} still shows pending.", "The money I sent {days} days ago hasn't arrived.",
        "Transfer to my landlord is stuck.", "When will my transfer of {amount} go through?")),
    Intent("balance", "asking for the balance", (
        "How much money is in my account?", "What's my current balance?",
        "Can you tell me my savings balance?", "Show me how much I have left this month.")),
    Intent("exchange_rate", "currency exchange rates", (
        "What rate do you use to convert {amount} to yen?", "Is the exchange rate better on weekends?",
        "How much is {amount} in dollars today?", "Why was my currency conversion so expensive?")),
    Intent("atm_cash", "problems withdrawing cash at an ATM", (
        "The ATM in {city} kept my card.", "I withdrew {amount} but the machine gave me nothing.",
        "ATM charged me a fee for a withdrawal.", "Cash machine said error but my account was debited.")),
    Intent("pin_change", "changing or unblocking a PIN", (
        "How do I change my PIN?", "My PIN is blocked after three tries.",
        "I forgot my card PIN.", "Can I set a new PIN in the app?")),
    Intent("direct_debit", "direct debits and standing orders", (
        "Cancel the direct debit to my gym.", "A direct debit of {amount} was taken twice.",
        "How do I set up a standing order for rent?", "Stop the monthly payment to {product}.")),
    Intent("account_close", "closing the account", (
        "I want to close my account.", "How do I shut down my savings account?",
        "Please close everything, I'm moving banks.", "Close my joint account with my partner.")),
    Intent("fraud_report", "suspicious or unknown transactions", (
        "There's a payment of {amount} I don't recognise.", "Someone used my account in {city}, I never went there.",
        "I think my account was hacked.", "Unknown charges from an online shop appeared.")),
    Intent("loan_info", "loans and borrowing", (
        "Can I borrow {amount} for a car?", "What interest do you charge on personal loans?",
        "How long does a loan approval take?", "I'd like to apply for a loan in {month}.")),
    Intent("address_change", "updating a postal address", (
        "I moved to {city}, update my address.", "How do I change my home address?",
        "My new address is in {city}, please update it.", "Statements go to my old flat, fix my address.")),
)


def _instructions_for(title: str, intents: tuple[Intent, ...]) -> str:
    lines = [title, "Answer with the code only, nothing else. The codes:"]
    lines += [f"{intent.label}: {intent.meaning}" for intent in intents]
    return "\n".join(lines)


TICKET_INSTRUCTIONS = _instructions_for("You route customer support tickets to the team that handles them.",
                                        TICKET_CODES)
BANK_INSTRUCTIONS = _instructions_for("You classify a bank customer's message by intent.", BANK_INTENTS)


def classification(intents: tuple[Intent, ...], instructions: str, count: int, seed: int) -> list[dict]:
    """``count`` distinct labelled messages, classes balanced, in a seeded shuffled order.

    Args:
        intents: the classes and their phrasings.
        instructions: the system prompt listing the labels.
        count: how many records.
        seed: the random seed (same seed, same records).
    """
    rng = random.Random(seed)
    records, seen = [], set()
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > count * 200:
            raise ValueError(f"cannot make {count} distinct messages from these templates")
        intent = intents[len(records) % len(intents)]
        text = _fill(rng.choice(FILLERS["greeting"]) + rng.choice(intent.templates) + rng.choice(FILLERS["closing"]),
                     rng)
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        records.append(_chat(instructions, text, intent.label))
    rng.shuffle(records)
    return records


ORDER_INSTRUCTIONS = (
    "Extract the order from the customer's message as JSON with exactly these keys: "
    '"customer" (first name), "item" (singular noun), "quantity" (integer), "city" (delivery city), '
    '"express" (true if they ask for fast delivery, else false). Output the JSON only.'
)
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kira", "Luis", "Mei", "Nils"]
ITEMS = ["chair", "lamp", "kettle", "notebook", "backpack", "mug", "printer", "desk", "blanket", "speaker"]
ORDER_TEMPLATES = (
    "Hi, this is {name}. Please send {qty} {items} to {city}.",
    "{name} here, I need {qty} {items} delivered in {city}{rush}.",
    "Could you ship {qty} {items} to {city}? Thanks, {name}",
    "Order for {name}: {qty} {items}, deliver to {city}{rush}.",
    "{qty} {items} to {city}{rush}, please. - {name}",
)
QUANTITY_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def order_extraction(count: int, seed: int) -> list[dict]:
    """``count`` distinct order messages and their house-schema JSON (compact, keys in schema order)."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < count:
        name, item, city = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(FILLERS["city"])
        qty = rng.randint(1, 12)
        express = rng.random() < 0.4
        qty_text = QUANTITY_WORDS.get(qty, str(qty)) if rng.random() < 0.5 else str(qty)
        items = item if qty == 1 else item + "s"
        rush = rng.choice([", express please", ", as fast as possible", ", urgently"]) if express else ""
        template = rng.choice([t for t in ORDER_TEMPLATES if "{rush}" in t] if express else ORDER_TEMPLATES)
        text = template.format(name=name, qty=qty_text, items=items, city=city, rush=rush)
        if text in seen:
            continue
        seen.add(text)
        answer = json.dumps({"customer": name, "item": item, "quantity": qty, "city": city, "express": express},
                            separators=(", ", ": "))
        records.append(_chat(ORDER_INSTRUCTIONS, text, answer))
    return records


def _chat(system: str, user: str, assistant: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


TASKS: dict[str, Callable[[int, int], list[dict]]] = {
    "ticket-codes": lambda count, seed: classification(TICKET_CODES, TICKET_INSTRUCTIONS, count, seed),
    "bank-intents": lambda count, seed: classification(BANK_INTENTS, BANK_INSTRUCTIONS, count, seed),
    "order-extraction": order_extraction,
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write ``records`` as JSONL, atomically."""
    with atomic_file(Path(path), "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)
