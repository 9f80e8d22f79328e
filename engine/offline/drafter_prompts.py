"""A seeded set of instructions of the Spec-Bench kinds, written for this project, for drafter training data.

Every prompt is a template filled from hand-written slot lists (names from ``engine.offline.names``); the passages
of summarisation, extraction and RAG prompts are paragraphs of ``assets/corpus/assistant_answers.txt`` or short
news items composed here. None of it comes from Spec-Bench: the drafters are evaluated on Spec-Bench questions and
must not have trained on them (tests/test_drafter_data.py checks that no prompt shares 8 words in a row with one).
The same seed always gives the same list, on any machine (only ``random.Random`` draws).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from engine.offline.names import FIRST_NAMES, LAST_NAMES
from engine.params import ParamError

KINDS = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities", "translation",
         "summarization", "qa", "rag")
CORPUS = Path(__file__).resolve().parents[2] / "assets" / "corpus" / "assistant_answers.txt"
MAX_DRAWS = 1000  # draws per prompt before a kind counts as exhausted
MIN_PASSAGE_WORDS = 30  # corpus paragraphs shorter than this (sign-offs, one-liners) make no passage

CITIES = ("Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Toronto", "Krakow", "Hanoi", "Seville", "Tallinn", "Perth",
          "Cape Town", "Montreal", "Porto", "Edinburgh", "Istanbul", "Marrakesh", "Reykjavik", "Bogota", "Vienna",
          "Seoul", "Dublin", "Buenos Aires", "Helsinki", "Athens", "Vancouver", "Mumbai", "Prague", "Quito", "Bergen")
COUNTRIES = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa",
             "Norway": "Oslo", "Australia": "Canberra", "Egypt": "Cairo", "Brazil": "Brasilia", "Poland": "Warsaw",
             "Vietnam": "Hanoi", "Chile": "Santiago", "Ireland": "Dublin", "Greece": "Athens", "India": "New Delhi"}
TOPICS = ("learning a new language as an adult", "the joy of cooking at home", "working from home", "city cycling",
          "keeping a journal", "saving money on groceries", "a rainy autumn evening", "the first day at a new job",
          "growing tomatoes on a balcony", "a night train across Europe", "public libraries", "learning to swim",
          "volunteering at an animal shelter", "a family recipe", "the value of boredom", "moving to a new city",
          "a childhood friend", "the ocean at dawn", "a small bakery", "reading before bed", "a mountain hike",
          "friendship across generations", "the sound of rain", "building a habit", "a lost umbrella")
FORMS = ("short poem", "short story", "blog post", "motivational speech", "haiku sequence", "diary entry",
         "letter to a friend", "newspaper column", "limerick", "product advertisement")
ADJECTIVES = ("cheerful", "thoughtful", "humorous", "formal", "nostalgic", "persuasive", "gentle", "lively")
COMPANY_PARTS = (("Bright", "North", "Blue", "Silver", "Green", "Swift", "Clear", "Oak", "Red", "Sun"),
                 ("wave", "field", "stone", "path", "river", "leaf", "bridge", "peak", "light", "harbor"),
                 ("Labs", "Systems", "Foods", "Energy", "Robotics", "Studios", "Logistics", "Health"))
PRODUCTS = ("a reusable water bottle", "a folding electric bike", "a smart thermostat", "a noise-cancelling headset",
            "a solar phone charger", "a ceramic chef's knife", "a standing desk", "a language-learning app",
            "a compact espresso machine", "a waterproof hiking jacket", "a sleep-tracking ring", "a kids' coding kit")
ROLES = ("a pirate captain", "a medieval blacksmith", "a chef in a busy kitchen", "a detective in 1920s London",
         "a patient kindergarten teacher", "an astronaut on a space station", "a grumpy old wizard",
         "a personal fitness coach", "a museum guide", "a friendly librarian", "a lighthouse keeper",
         "a travel agent", "a beekeeper", "a jazz musician", "a park ranger", "a sports commentator")
ROLE_QUESTIONS = ("How would you describe an ordinary day at work?", "What advice do you have for a beginner?",
                  "What is the hardest part of your job?", "What surprised you most this year?", "What would you say to someone who feels like giving up?",
                  "What do you do to relax after work?", "How do you deal with difficult people?",
                  "Describe the place where you spend most of your time.")
CONCEPTS = ("photosynthesis", "entropy", "plate tectonics", "the greenhouse effect", "natural selection",
            "electric current", "the immune system", "black holes", "DNA replication", "the water cycle",
            "vaccines", "nuclear fusion", "machine learning", "compound interest", "buoyancy", "friction",
            "the Doppler effect", "antibiotic resistance", "neurons", "ocean tides", "radioactive decay",
            "the speed of sound", "chemical bonds", "gravity", "solar panels", "climate models", "blood pressure")
CONCEPT_PAIRS = (("weather", "climate"), ("a virus", "a bacterium"), ("speed", "velocity"), ("mass", "weight"),
                 ("mitosis", "meiosis"), ("an element", "a compound"), ("heat", "temperature"), ("RAM", "storage"),
                 ("an asteroid", "a comet"), ("AC", "DC current"), ("a genotype", "a phenotype"),
                 ("an acid", "a base"))
DEVICES = ("a refrigerator", "a microwave oven", "GPS navigation", "a touch screen", "a jet engine", "Wi-Fi",
           "a heat pump", "an electric motor", "a camera lens", "a battery", "noise-cancelling headphones")
HISTORY = ("the Industrial Revolution", "the fall of the Roman Empire", "the invention of the printing press",
           "the French Revolution", "the Silk Road trade", "the space race", "the Renaissance in Italy",
           "the end of the Cold War", "the abolition of slavery", "the spread of railways in the 19th century")
THINKERS = ("Socrates", "Confucius", "Adam Smith", "Mary Wollstonecraft", "Immanuel Kant", "Simone de Beauvoir",
            "John Locke", "Ibn Khaldun", "Karl Marx", "Hannah Arendt")
FIELDS = ("modern education", "economics", "political thought", "ethics", "the idea of human rights")
THEMES = ("courage", "loneliness", "justice", "memory", "ambition", "freedom", "tradition", "progress")
SOCIAL = ("social media", "remote work", "urbanisation", "tourism", "minimum wage laws", "public transport",
          "universal basic income", "automation", "four-day work weeks", "online education")
CODE_TASKS = ("reverses a string", "checks whether a number is prime", "counts the vowels in a sentence",
              "returns the second largest number in a list", "merges two sorted lists",
              "removes duplicates from a list while keeping the order", "converts Celsius to Fahrenheit",
              "checks whether a word is a palindrome", "computes the factorial of n",
              "returns the n-th Fibonacci number", "flattens a nested list", "counts word frequencies in a text",
              "finds the longest word in a sentence", "validates an email address with a simple rule",
              "computes the average of a list, ignoring None values", "rotates a list by k positions",
              "groups a list of words by their first letter", "finds two numbers that add up to a target")
CODE_CONSTRAINTS = ("", " Do not use any library.", " Handle empty input.", " Add comments.", " Keep it short.")
LANGUAGES = ("Python", "Python", "Python", "JavaScript", "Java", "C", "Go", "Rust")
ITEMS = (("notebooks", 3), ("apples", 1), ("pencils", 2), ("movie tickets", 12), ("plants", 7), ("books", 15),
         ("cupcakes", 4), ("T-shirts", 9), ("bus passes", 25), ("candles", 6))
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
JOBS = (("teacher", "Lehrerin"), ("doctor", "Arzt"), ("baker", "Bäcker"), ("engineer", "Ingenieurin"),
        ("nurse", "Krankenpfleger"), ("journalist", "Journalistin"), ("gardener", "Gärtner"))
GERMAN_SENTENCES = (
    "{name} wohnt seit {n} Jahren in {city} und arbeitet dort als {job_de}.",
    "Am {day_de} regnet es in {city}, deshalb bleiben die Kinder zu Hause.",
    "Die Firma {company} hat im letzten Jahr {n} neue Mitarbeiter eingestellt.",
    "Der Zug nach {city} hat heute {n} Minuten Verspätung.",
    "{name} liest jeden Abend ein Buch, bevor sie schlafen geht.",
    "Die Preise für Lebensmittel sind in diesem Jahr um {n} Prozent gestiegen.",
    "Nach dem Konzert gingen wir noch in ein kleines Restaurant in der Altstadt.",
    "Die Stadtverwaltung von {city} plant einen neuen Park am Fluss.",
    "{name} hat am {day_de} ein Interview mit der Zeitung gegeben.",
    "Wegen des Streiks fallen morgen alle Flüge nach {city} aus.",
    "Die Schüler besuchen nächste Woche das Museum für Naturkunde.",
    "Im Sommer fahren viele Familien an die Küste, um sich zu erholen.",
)
WEEKDAYS_DE = ("Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag")
TARGET_LANGUAGES = ("French", "Spanish", "German", "Italian")
QA_QUESTIONS = (
    lambda r: f"what is the capital of {r.choice(list(COUNTRIES))}?",
    lambda r: f"how many {r.choice(('days', 'hours', 'minutes', 'weeks'))} are there in a "
              f"{r.choice(('year', 'leap year', 'week', 'day'))}?",
    lambda r: f"who discovered {r.choice(('penicillin', 'gravity', 'radium', 'the electron', 'x-rays'))}?",
    lambda r: f"what is the boiling point of {r.choice(('water', 'ethanol', 'nitrogen', 'mercury'))}?",
    lambda r: f"who wrote {r.choice(('Pride and Prejudice', 'Hamlet', 'Don Quixote', 'War and Peace', 'Moby Dick'))}?",
    lambda r: f"which planet is {r.choice(('the largest', 'closest to the sun', 'known as the red planet'))}?",
    lambda r: f"what language is spoken in {r.choice(('Brazil', 'Austria', 'Mexico', 'Quebec', 'Egypt'))}?",
    lambda r: f"how tall is {r.choice(('Mount Everest', 'the Eiffel Tower', 'Mont Blanc', 'Kilimanjaro'))}?",
    lambda r: f"when was {r.choice(('the telephone', 'the light bulb', 'the bicycle', 'the internet'))} invented?",
    lambda r: f"what is the largest {r.choice(('ocean', 'desert', 'mammal', 'country', 'lake'))} in the world?",
    lambda r: f"where is {r.choice(('the Great Barrier Reef', 'Machu Picchu', 'the Sahara', 'Angkor Wat'))} located?",
    lambda r: f"what does {r.choice(('a thermometer', 'a barometer', 'a seismograph', 'an ammeter'))} measure?",
    lambda r: f"what language is spoken in {r.choice(list(COUNTRIES))}?",
    lambda r: f"where is {r.choice(CITIES)} located?",
    lambda r: f"what is {r.choice(CITIES)} famous for?",
    lambda r: f"what is {r.choice(CONCEPTS)}?",
    lambda r: f"who was {r.choice(THINKERS)}?",
    lambda r: f"when did {r.choice(HISTORY)} happen?",
    lambda r: f"what is the currency of {r.choice(list(COUNTRIES))}?",
    lambda r: "how far is {} from {}?".format(*r.sample(CITIES, 2)),
)

Generator = Callable[[random.Random], str]


@dataclass(frozen=True)
class Prompt:
    kind: str
    text: str


def build_prompts(count: int, seed: int) -> list[Prompt]:
    """``count`` distinct prompts, the kinds taking turns so that every prefix covers them evenly."""
    rng = random.Random(seed)
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        for _ in range(MAX_DRAWS):
            text = GENERATORS[kind](rng)
            if text not in seen:  # a repeat would only weigh one answer twice
                break
        else:
            raise ParamError(f"the {kind} templates ran out of distinct prompts; ask for fewer sequences than {count}")
        seen.add(text)
        prompts.append(Prompt(kind, text))
    return prompts


# ---------------------------------------------------------------- slot fillers


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def company(rng: random.Random) -> str:
    first, second, suffix = (rng.choice(part) for part in COMPANY_PARTS)
    return f"{first}{second} {suffix}"


@cache
def corpus_passages() -> tuple[str, ...]:
    """The prose paragraphs of the corpus long enough to summarise or question."""
    paragraphs = CORPUS.read_text(encoding="utf-8").split("\n\n")
    return tuple(p.strip() for p in paragraphs if len(p.split()) >= MIN_PASSAGE_WORDS and "```" not in p)


def news_item(rng: random.Random) -> tuple[str, dict[str, str]]:
    """A short invented news story and its facts (for extraction and RAG questions)."""
    facts = {"company": company(rng), "founder": person(rng), "city": rng.choice(CITIES),
             "year": str(rng.randint(1950, 2022)), "staff": str(rng.randrange(20, 5000, 10)),
             "product": rng.choice(PRODUCTS), "day": rng.choice(WEEKDAYS), "reporter": person(rng)}
    text = (f"{facts['company']}, founded in {facts['year']} by {facts['founder']} in {facts['city']}, announced on "
            f"{facts['day']} that it will start selling {facts['product']} next spring. The company, which employs "
            f"about {facts['staff']} people, said the launch follows two years of testing with local customers. "
            f"\"We listened to what people asked for and kept the price low,\" {facts['founder']} told reporters. "
            f"Analysts expect strong demand, although some warned that supply costs remain high. "
            f"Reporting by {facts['reporter']}.")
    return text, facts


def passage(rng: random.Random) -> str:
    return rng.choice(corpus_passages()) if rng.random() < 0.6 else news_item(rng)[0]


def word_limit(rng: random.Random) -> str:
    return rng.choice(("", "", f" Keep it under {rng.choice((50, 80, 100, 150))} words.", " Be concise."))


# ---------------------------------------------------------------- one generator per kind


def writing(rng: random.Random) -> str:
    templates = (
        lambda: f"Write a {rng.choice(ADJECTIVES)} {rng.choice(FORMS)} about {rng.choice(TOPICS)}.",
        lambda: f"Draft a short email to {person(rng)} asking to move our meeting to {rng.choice(WEEKDAYS)}.",
        lambda: f"Write a travel blog post about a weekend in {rng.choice(CITIES)}, with tips on food and sights.",
        lambda: f"Write a product description for {rng.choice(PRODUCTS)} sold by {company(rng)}.",
        lambda: f"Describe {rng.choice(TOPICS)} in {rng.randint(3, 6)} vivid sentences.",
        lambda: f"Write the opening paragraph of a mystery novel set in {rng.choice(CITIES)}.",
        lambda: f"Give me a catchy slogan and a two-sentence pitch for {company(rng)}, a startup making "
                f"{rng.choice(PRODUCTS)}.",
        lambda: f"Write a thank-you note to {person(rng)} for helping with {rng.choice(TOPICS)}.",
    )
    return rng.choice(templates)() + word_limit(rng)


def roleplay(rng: random.Random) -> str:
    role = rng.choice(ROLES)
    templates = (
        lambda: f"Pretend you are {role}. {rng.choice(ROLE_QUESTIONS)}",
        lambda: f"Act as {role} and stay in character. {rng.choice(ROLE_QUESTIONS)}",
        lambda: f"You are {role}. A visitor from {rng.choice(CITIES)} asks you: \"{rng.choice(ROLE_QUESTIONS)}\" "
                "Answer them.",
        lambda: f"Imagine you are {role} writing a letter to {person(rng)} about {rng.choice(TOPICS)}.",
    )
    return rng.choice(templates)()


def reasoning(rng: random.Random) -> str:
    a, b, c = rng.sample(FIRST_NAMES, 3)
    n, m = rng.randint(2, 6), rng.randint(2, 5)
    templates = (
        lambda: f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest of the three? Explain.",
        lambda: f"{a} has {n} brothers. Each of the brothers has {m} sisters. How many sisters does {a} have?",
        lambda: f"If today is {rng.choice(WEEKDAYS)}, what day of the week will it be in {rng.randint(3, 40)} days?",
        lambda: f"All {rng.choice(('cats', 'doctors', 'birds'))} in the village are {rng.choice(('friendly', 'old'))}. "
                f"{a} lives in the village and is not {rng.choice(('friendly', 'old'))}. What can we conclude? "
                "Reason step by step.",
        lambda: f"{a} finished a race ahead of {b} but behind {c}. Who came first, second and third?",
        lambda: f"A box holds red and blue marbles. There are {n} more red than blue, and {n * 2 + m * 2} in "
                "total. How many of each colour are there?",
        lambda: f"Find the odd one out among these words and say why: "
                f"{', '.join(rng.sample(('apple', 'banana', 'carrot', 'cherry', 'grape'), 4))}?",
    )
    return rng.choice(templates)()


def math(rng: random.Random) -> str:
    name = rng.choice(FIRST_NAMES)
    item, price = rng.choice(ITEMS)
    count, x, y = rng.randint(2, 9), rng.randint(2, 30), rng.randint(2, 30)
    templates = (
        lambda: f"Solve for x: {x}x + {y} = {x * rng.randint(1, 12) + y}.",
        lambda: f"{name} buys {count} {item} at ${price} each and pays with a ${price * count + rng.choice((5, 10, 20))}"
                " bill. How much change comes back?",
        lambda: f"A train covers {x * 10} km in {count} hours. What is its average speed in km per hour?",
        lambda: f"What is {rng.choice((5, 10, 15, 20, 25, 40))}% of {x * 20}?",
        lambda: f"{name} saves ${x} every week. How many weeks will it take to save ${x * y}?",
        lambda: f"Find the greatest common divisor of {x * count} and {y * count}.",
        lambda: f"A rectangle is {x} cm long and {y} cm wide. What are its perimeter and its area?",
        lambda: f"A recipe needs {count} cups of flour for {x} cookies. How much flour is needed for {x * 3} "
                "cookies?",
        lambda: f"What is the sum of the whole numbers from 1 to {x * 5}?",
        lambda: f"{name} reads {x} pages a day. The book has {x * y + count} pages. After how many days is it "
                "finished?",
    )
    return rng.choice(templates)()


def coding(rng: random.Random) -> str:
    task, language = rng.choice(CODE_TASKS), rng.choice(LANGUAGES)
    name = rng.choice(("values", "items", "data", "numbers"))
    templates = (
        lambda: f"Write a {language} function that {task}.{rng.choice(CODE_CONSTRAINTS)}",
        lambda: f"Write a {language} function that {task}, and add a short example of how to call it.",
        lambda: "Explain what this Python code does:\n"
                f"def f({name}):\n    result = []\n    for v in {name}:\n        if v % {rng.randint(2, 5)} == 0:\n"
                "            result.append(v * v)\n    return result",
        lambda: "Find the bug in this function and fix it:\n"
                f"def average({name}):\n    total = 0\n    for v in {name}:\n        total += v\n"
                f"    return total / (len({name}) - 1)",
        lambda: f"Write a SQL query that lists the {rng.randint(3, 10)} customers with the most orders from the "
                "tables customers(id, name) and orders(id, customer_id, total).",
        lambda: f"How would you test a function that {task}? Give three test cases.",
    )
    return rng.choice(templates)()


def extraction(rng: random.Random) -> str:
    story = news_item(rng)[0]
    templates = (
        lambda: f"Extract every person, place, company and year from the text below. Answer in JSON.\n\n{story}",
        lambda: f"From this news item, give the company name, its founder and its number of employees as a "
                f"list.\n\n{story}",
        lambda: f"List the main topic and three keywords of this paragraph:\n\n{rng.choice(corpus_passages())}",
        lambda: f"Read the text and name the product that will be sold and when.\n\n{story}",
    )
    return rng.choice(templates)()


def stem(rng: random.Random) -> str:
    left, right = rng.choice(CONCEPT_PAIRS)
    templates = (
        lambda: f"Explain {rng.choice(CONCEPTS)} in simple terms.",
        lambda: f"What is the difference between {left} and {right}?",
        lambda: f"How does {rng.choice(DEVICES)} work?",
        lambda: f"Explain {rng.choice(CONCEPTS)} to a student aged {rng.randint(8, 15)}, with an example.",
        lambda: f"What are the main uses of {rng.choice(CONCEPTS)} in everyday life?",
    )
    return rng.choice(templates)() + word_limit(rng)


def humanities(rng: random.Random) -> str:
    templates = (
        lambda: f"What were the main causes and consequences of {rng.choice(HISTORY)}?",
        lambda: f"How did {rng.choice(THINKERS)} influence {rng.choice(FIELDS)}?",
        lambda: f"What can literature teach us about {rng.choice(THEMES)}?",
        lambda: f"Discuss the advantages and disadvantages of {rng.choice(SOCIAL)} for society.",
        lambda: f"What effect does {rng.choice(SOCIAL)} have on daily life in cities like {rng.choice(CITIES)}?",
        lambda: f"Compare the ideas of {' and '.join(rng.sample(THINKERS, 2))} on {rng.choice(THEMES)}.",
    )
    return rng.choice(templates)() + word_limit(rng)


def translation(rng: random.Random) -> str:
    if rng.random() < 0.6:
        job = rng.choice(JOBS)[1]
        sentence = rng.choice(GERMAN_SENTENCES).format(
            name=person(rng), n=rng.randint(2, 40), city=rng.choice(CITIES), job_de=job,
            day_de=rng.choice(WEEKDAYS_DE), company=company(rng))
        return f"Translate German to English: {sentence}"
    sentences = re.split(r"(?<=[.!?])\s+", rng.choice(corpus_passages()))
    return f"Translate into {rng.choice(TARGET_LANGUAGES)}: {rng.choice(sentences)}"


def summarization(rng: random.Random) -> str:
    text = passage(rng)
    templates = ("Summarize: {}", "Summarize the following text in one sentence:\n\n{}",
                 "Give a three-point summary of this text:\n\n{}", "What is the main idea of this passage?\n\n{}")
    return rng.choice(templates).format(text)


def qa(rng: random.Random) -> str:
    return rng.choice(QA_QUESTIONS)(rng)


def rag(rng: random.Random) -> str:
    story, facts = news_item(rng)
    questions = (f"Who founded {facts['company']}?", f"In which year was {facts['company']} founded?",
                 f"How many people work at {facts['company']}?", f"What will {facts['company']} start selling?")
    documents = [story, rng.choice(corpus_passages())]
    rng.shuffle(documents)
    context = "\n\n".join(f"Document {i + 1}: {text}" for i, text in enumerate(documents))
    return f"{context}\n\nUsing only the documents above, answer: {rng.choice(questions)}"


GENERATORS: dict[str, Generator] = {
    "writing": writing, "roleplay": roleplay, "reasoning": reasoning, "math": math, "coding": coding,
    "extraction": extraction, "stem": stem, "humanities": humanities, "translation": translation,
    "summarization": summarization, "qa": qa, "rag": rag,
}
