"""The wording of ParallelBench's "waiting line" instructions: the prompts the built-in waitline models were
trained on, so a model's card and the training data render them alike."""

from __future__ import annotations

import json

PREAMBLE = "You are managing a waiting line at a customer service desk.\n"
TEMPLATES = {
    "copy": "You need to record the following people in the order they arrived:\n{context}\n"
    "Please copy the list exactly and provide only the final list.\n",
    "reverse": "The previous staff member put the waiting line in the wrong order.\n"
    "Please reverse the order of the following people in the waiting line to correct it:\n{context}\n"
    "Please reverse the order of the list and provide only the final list.\n",
    "sort": "The following people should be organized alphabetically by last name for efficient processing:\n"
    "{context}\nPlease sort the list in alphabetical order and provide only the final list.\n",
    "shuffle": "The waiting line should be randomly shuffled to ensure fair service distribution:\n{context}\n"
    "Please randomly shuffle the list and provide only the final list.\n"
    "Ensure the sequence is different from the original.\n",
    "insert_index": 'A new person "{word}" is inserted into the line at position {index}:\n{context}\n'
    "Please put the new person at the specified position and provide only the final list.\n",
    "remove_index": "The person at position {index} has left the waiting line:\n{context}\n"
    "Please remove the person at the specified position and provide only the final list.\n",
    "replace_index": 'The person at position {index} must be replaced with "{word}":\n{context}\n'
    'Please replace the person at the specified position with "{word}" and provide only the final list.\n',
    "insert_random": 'A new person "{word}" is inserted into the line at a random position:\n{context}\n'
    "Please put the new person in the random position and provide only the final list.\n",
    "remove_random": "One person has left the waiting line:\n{context}\n"
    "Please remove a random person and provide only the final list.\n",
    "replace_random": 'One person in the waiting line must be replaced with "{word}":\n{context}\n'
    'Please replace one random person with "{word}" and provide only the final list.',
}
OPERATIONS = tuple(TEMPLATES)


def format_list(people: list[str] | tuple[str, ...]) -> str:
    return json.dumps(list(people))


def render_prompt(operation: str, people: list[str], word: str | None = None, index: int | None = None) -> str:
    return PREAMBLE + TEMPLATES[operation].format(context=format_list(people), word=word, index=index)
