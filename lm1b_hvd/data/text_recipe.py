"""How plain text becomes a corpus's tokens, and tokens text again: the recipe that
`prepare_data text` applies to every line and writes to D/prepare.json, so that `score` and
`sample` treat a user's sentences as the training text was treated.

lm1b was tokenized with Moses' rules, without escaping (`it 's`, `don 't`, a quote a token of
its own); sacremoses is the maintained Python port of them.
"""
import dataclasses
import functools
import json
import os
import re
import unicodedata

from lm1b_hvd import console

RECIPE_FILE = "prepare.json"
TOKENIZERS = ("moses", "none")
UNICODE_FORMS = ("none", "NFC", "NFKC")
_WHITESPACE = re.compile(r"\s+")


class RecipeError(console.UserError):
    """A prepare.json that cannot be read back."""


@dataclasses.dataclass(frozen=True)
class TextRecipe:
    tokenizer: str = "moses"  # moses: Moses' rules (sacremoses) | none: the text is tokens already
    language: str = "en"  # Moses' language rules (non-breaking prefixes)
    lowercase: bool = False
    unicode_form: str = "none"  # none | NFC | NFKC, applied before anything else

    def __post_init__(self):
        if self.tokenizer not in TOKENIZERS:
            raise RecipeError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.unicode_form not in UNICODE_FORMS:
            raise RecipeError(f"unicode form must be one of {', '.join(UNICODE_FORMS)}, got {self.unicode_form!r}")

    def tokens(self, text):
        """The tokens of one line of text: Unicode form, whitespace, Moses' rules, case."""
        if self.unicode_form != "none":
            text = unicodedata.normalize(self.unicode_form, text)
        text = _WHITESPACE.sub(" ", text).strip()
        if not text:
            return []
        tokens = self._moses[0].tokenize(text, escape=False) if self.tokenizer == "moses" else text.split(" ")
        return [token.lower() for token in tokens] if self.lowercase else tokens

    def text(self, tokens):
        """Tokens back to text as a reader would write it (Moses' detokenizer)."""
        if self.tokenizer == "none":
            return " ".join(tokens)
        return self._moses[1].detokenize(list(tokens))

    @functools.cached_property
    def _moses(self):
        from sacremoses import MosesDetokenizer, MosesTokenizer  # only where a recipe tokenizes
        return MosesTokenizer(lang=self.language), MosesDetokenizer(lang=self.language)

    def to_dict(self):
        return dataclasses.asdict(self)


def write_recipe(datadir, recipe, **facts):
    """D/prepare.json: the recipe, and what else the corpus's maker records (`facts`)."""
    console.write_atomically(os.path.join(datadir, RECIPE_FILE),
                             json.dumps({"recipe": recipe.to_dict(), **facts}, indent=1) + "\n")


def read_recipe(datadir):
    """The TextRecipe of a corpus `prepare_data text` or `prepare_data lm1b` made, or None (the
    demo, a corpus tokenized by hand: their text is tokens)."""
    path = os.path.join(datadir, RECIPE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            recipe = json.load(handle)["recipe"]
        return TextRecipe(**recipe)
    except (ValueError, KeyError, TypeError) as err:
        raise RecipeError(f"{path}: not a recipe prepare_data wrote ({err})") from None
