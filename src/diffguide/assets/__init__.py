"""Files shipped inside the package: the built-in toy models and the toy-world evaluator."""

import os

ROOT = os.path.dirname(os.path.abspath(__file__))


def path(*parts: str) -> str:
    return os.path.join(ROOT, *parts)
