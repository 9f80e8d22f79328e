"""Person names: common English names listed by hand (the drafter prompts' slots and the waitline tokenizer's merges),
and the waiting-line data's large, varied pool with a fixed train / held-out split.

The pool is the hand lists plus the first and last names of Faker's person providers in several Latin-script locales,
read from the providers' lists (not from Faker's random calls, so it depends on the installed Faker's lists only),
accents stripped and kept only when plain ASCII letters with inner hyphens or apostrophes remain. A name's split is a
hash of the name itself: adding locales or names never moves a name from one split to the other, and a name that is
both a first and a last name has one split in both roles.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
import unicodedata

FIRST_NAMES = """
Aaron Abigail Adam Adrian Aiden Alan Albert Alex Alexander Alexis Alice Alicia Allison Amanda Amber Amy Andrea Andrew
Angela Anna Anne Anthony Antonio April Arthur Ashley Austin Barbara Benjamin Betty Beverly Billy Bobby Bonnie Bradley
Brandon Brenda Brian Brittany Bruce Bryan Caleb Cameron Carl Carlos Carol Caroline Carolyn Catherine Chad Charles
Charlotte Cheryl Chloe Christian Christina Christine Christopher Cindy Claire Clara Colin Connor Craig Crystal Cynthia
Daisy Dale Daniel Danielle David Dawn Dean Deborah Debra Dennis Derek Diana Diane Dominic Donald Donna Doris Dorothy
Douglas Dylan Edith Edward Eileen Elaine Eleanor Elijah Elizabeth Ella Ellen Emily Emma Eric Erica Erin Ethan Eugene
Evan Evelyn Felix Fiona Frances Francis Frank Gabriel Gail Gary George Gerald Gloria Grace Gregory Hannah Harold Harry
Heather Helen Henry Holly Howard Ian Irene Isaac Isabel Jack Jacob Jacqueline Jake James Jamie Janet Janice Jared Jason
Jean Jeffrey Jennifer Jeremy Jerry Jesse Jessica Joan Joanna Joe Joel John Johnny Jonathan Jordan Jose Joseph Joshua
Joyce Juan Judith Judy Julia Julie Justin Karen Katherine Kathleen Kathy Kayla Keith Kelly Kenneth Kevin Kimberly
Kyle Laura Lauren Lawrence Leah Leo Leonard Lily Linda Lisa Logan Lori Louis Lucas Lucy Luke Lydia Madison Marcus
Margaret Maria Marie Marilyn Mark Martha Martin Mary Mason Matthew Megan Melissa Michael Michelle Mildred Molly Monica
Nancy Natalie Nathan Nicholas Nicole Noah Nora Oliver Olivia Oscar Owen Pamela Patricia Patrick Paul Paula Peggy Peter
Philip Phyllis Rachel Ralph Randy Raymond Rebecca Regina Richard Rita Robert Robin Roger Ronald Rose Ruby Russell Ruth
Ryan Samantha Samuel Sandra Sara Sarah Scott Sean Sharon Shirley Simon Sophia Stanley Stephanie Stephen Steven Susan
Sylvia Tammy Teresa Terry Theresa Thomas Timothy Tina Todd Tony Tracy Travis Tyler Valerie Vanessa Victor Victoria
Vincent Virginia Walter Wanda Wayne Wendy William Willie Zachary Zoe
""".split()

LAST_NAMES = """
Adams Alexander Allen Alvarez Anderson Armstrong Arnold Austin Bailey Baker Banks Barnes Bell Bennett Berry Bishop
Black Boyd Bradley Brooks Brown Bryant Burke Burns Butler Campbell Carlson Carpenter Carroll Carter Castillo Chapman
Chavez Clark Cole Coleman Collins Cook Cooper Cox Crawford Cruz Cunningham Daniels Davidson Davis Dean Diaz Dixon
Douglas Duncan Dunn Edwards Elliott Ellis Evans Ferguson Fernandez Fisher Fleming Flores Ford Foster Fox Franklin
Freeman Garcia Gardner Gibson Gilbert Gomez Gonzales Gordon Graham Grant Gray Green Griffin Hall Hamilton Hansen Harper
Harris Harrison Hart Hawkins Hayes Henderson Henry Hernandez Hicks Hill Holland Holmes Howard Hudson Hughes Hunt Hunter
Jackson James Jenkins Jensen Johnson Johnston Jones Jordan Kelley Kelly Kennedy Kim King Knight Lane Larson Lawrence
Lawson Lee Lewis Long Lopez Lynch Marshall Martin Martinez Mason Matthews Mcdonald Medina Meyer Miller Mills Mitchell
Montgomery Moore Morales Moreno Morgan Morris Murphy Murray Myers Nelson Newman Nichols Nguyen Oliver Olson Ortiz Owens
Palmer Parker Patel Patterson Payne Perez Perkins Perry Peters Peterson Phillips Pierce Porter Powell Price Ramirez
Ramos Reed Reid Reyes Reynolds Rice Richards Richardson Riley Rivera Roberts Robertson Robinson Rodriguez Rogers Romero
Rose Ross Russell Ryan Sanchez Sanders Schmidt Scott Shaw Simmons Simpson Smith Snyder Spencer Stanley Stephens Stevens
Stewart Stone Sullivan Sutton Taylor Thomas Thompson Torres Tran Tucker Turner Wagner Walker Wallace Walsh Ward Warren
Washington Watkins Watson Weaver Webb Wells West Wheeler White Williams Willis Wilson Wood Woods Wright Young
""".split()

FAKER_LOCALES = (
    "en_US", "en_GB", "en_IE", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR", "pl_PL", "sv_SE", "da_DK", "no_NO",
    "fi_FI", "tr_TR", "id_ID",
)
# ParallelBench's lists are common English names ("Paul Payne", "Grace Wright"): the generator draws a share from these
ENGLISH_LOCALES = ("en_US", "en_GB", "en_IE")
KINDS = ("first", "last")
SPLITS = ("train", "held_out")
HELD_OUT_PERCENT = 12
PLAIN_NAME = re.compile(r"[A-Z][A-Za-z]*(?:['-][A-Za-z]+)*[a-z]")  # a space would split a person into three names


def plain(name: str) -> str | None:
    """``name`` with its accents stripped, or None when anything but ASCII letters, hyphens and apostrophes is left."""
    stripped = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    return stripped if PLAIN_NAME.fullmatch(stripped) else None


def split_of(name: str) -> str:
    """The split a name belongs to: a hash of the name, so it never depends on which lists are loaded."""
    bucket = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") % 100
    return "held_out" if bucket < HELD_OUT_PERCENT else "train"


@functools.cache
def faker_names(locale: str, kind: str) -> tuple[str, ...]:
    """A locale's plain first or last names (male, female and neutral lists together), sorted."""
    provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
    found: set[str] = set()
    for attribute in (f"{kind}_names", f"{kind}_names_male", f"{kind}_names_female", f"male_{kind}_names",
                      f"female_{kind}_names", f"unisex_{kind}_names"):  # pl_PL spells its lists the second way
        found.update(getattr(provider, attribute, ()))  # a sequence, or a dict of name -> weight
    return tuple(sorted({name for name in map(plain, found) if name}))


@functools.cache
def name_pool(kind: str, split: str, locales: tuple[str, ...] = FAKER_LOCALES) -> tuple[str, ...]:
    """Every first (``kind`` "first") or last name of ``split`` ("train" or "held_out") in the hand lists and
    ``locales``' lists, sorted and distinct."""
    if kind not in KINDS or split not in SPLITS:
        raise ValueError(f"kind must be one of {KINDS} and split one of {SPLITS}, not {kind!r} and {split!r}")
    names = set(FIRST_NAMES if kind == "first" else LAST_NAMES)
    for locale in locales:
        names.update(faker_names(locale, kind))
    return tuple(sorted(name for name in names if split_of(name) == split))


def common_names(kind: str, split: str) -> tuple[str, ...]:
    """The hand-listed common English first (``kind`` "first") or last names of ``split``: the kind of names
    ParallelBench's lists are made of, and (the training split's) one token each in the waitline tokenizer."""
    return name_pool(kind, split, locales=())  # the pool without any locale's lists is the hand lists
