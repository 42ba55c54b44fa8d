# B batch, T time, V vocab
"""The "a"/"an" probe: does the model still pick a vowel-sound word after "an" and a consonant-sound one after "a"?

Token classes, decided from the tokenizer's vocabulary alone:

1. Only word-initial tokens count: the token string starts with the tokenizer's space marker ("Ġ" for
   byte-level BPE as in GPT-2 and SmolLM2, "▁" for SentencePiece) followed by an ASCII letter. Tokens that
   continue a word, or start with a digit, punctuation or a non-ASCII letter, are in neither class.
2. The letters of the token (after the marker, up to the first non-letter) are the start of the word.
3. Acronyms: when those letters are all upper case and at most three long ("FBI", "X", "MP"), the word is
   read letter by letter, so the first letter's name decides: A E F H I L M N O R S X sound like a vowel
   ("an FBI agent", "an X-ray"), the others do not ("a UN vote", "a BBC show").
4. Otherwise the lower-cased letters decide, with the exceptions English needs, matched as word starts:
   - a silent "h" sounds like a vowel: hour, honest, honour, honor, heir ("an hour", "an honest man");
   - "u" and "eu" said "you", and "o" said "w", sound like a consonant: uni- (but unin-, unim-, unid-,
     which are the prefix un-, sound like a vowel), unan-, use, usu-, usa-, uti-, uto-, ura-, uri-, ubi-,
     ukr-, uku-, eu-, ewe, one, once ("a university", "a European", "a one-way street");
   - every other word is classed by its first letter: a e i o u is a vowel sound, anything else a consonant.
   A token shorter than an exception (" u", " un", " h", " hon", " o") follows the general rule of its
   first letter, since the letters that would decide are not part of it.

Metrics over a set of contexts that end in the article token (" a", " an", " A", " An"): for each context,
the next-token distribution's total mass on each class. A context is right when the correct class (vowel
after "an", consonant after "a") gets more mass than the other. Reported per article: the number of
contexts, the accuracy, the mean mass on the correct class, and the mean share of the correct class within
the two classes' mass. Because the consonant class holds most of the vocabulary, a model that ignores the
article is right after "a" and wrong after "an"; the headline `balanced_accuracy` is the mean of the two
per-article accuracies, so such a model scores about 0.5 (None when one article has no context).

Contexts come from a built-in list (`train/data/article_prefixes.json`: each prefix is used with both
articles) or from held-out token blocks, wherever an article token is followed by a classed token.
"""

import json
from importlib import resources

import torch

__all__ = [
    "article_token_classes",
    "probe_unsupported",
    "classify_word_start",
    "builtin_contexts",
    "heldout_contexts",
    "article_probe",
]

MARKERS = ("Ġ", "▁")
VOWEL_LETTER_NAMES = set("AEFHILMNORSX")
VOWEL_SOUND_PREFIXES = ("hour", "honest", "honour", "honor", "heir", "unin", "unim", "unid")
CONSONANT_SOUND_PREFIXES = (
    "uni", "unan", "use", "usu", "usa", "uti", "uto", "ura", "uri", "ubi", "ukr", "uku", "eu", "ewe", "one", "once",
)
ARTICLES = {"a": ("a", "A"), "an": ("an", "An", "AN")}


def classify_word_start(letters):
    """Returns "vowel" or "consonant" for the ASCII letters that start a word, by the rule in the module doc.

    Args:
        letters: one or more ASCII letters, e.g. "hour", "FBI", "uni".

    Returns:
        "vowel" when the word is said with a vowel sound first (takes "an"), else "consonant".

    Example:
        >>> classify_word_start("honest"), classify_word_start("university"), classify_word_start("FBI")
        ('vowel', 'consonant', 'vowel')
    """
    if not letters or not letters.isascii() or not letters.isalpha():
        raise ValueError(f"expected one or more ASCII letters, got {letters!r}")
    if letters.isupper() and len(letters) <= 3:
        return "vowel" if letters[0] in VOWEL_LETTER_NAMES else "consonant"
    word = letters.lower()
    if word.startswith(VOWEL_SOUND_PREFIXES):
        return "vowel"
    if word.startswith(CONSONANT_SOUND_PREFIXES):
        return "consonant"
    return "vowel" if word[0] in "aeiou" else "consonant"


def _space_marker(tokens):
    counts = {m: sum(1 for t in tokens if t and t.startswith(m)) for m in MARKERS}
    marker = max(counts, key=counts.get)
    if counts[marker] == 0:
        raise ValueError(f"expected a tokenizer whose word-initial tokens start with one of {MARKERS}, found none")
    return marker


def _word_letters(token, marker):
    if not token or not token.startswith(marker):
        return ""
    rest = token[len(marker):]
    n = 0
    while n < len(rest) and rest[n].isascii() and rest[n].isalpha():
        n += 1
    return rest[:n]


def _vocab_tokens(tokenizer):
    n = len(tokenizer)
    return tokenizer.convert_ids_to_tokens(list(range(n)))


def article_token_classes(tokenizer):
    """Splits the vocabulary into tokens that begin a vowel-sound word and a consonant-sound word.

    Args:
        tokenizer: a HuggingFace tokenizer with a space marker ("Ġ" or "▁") on word-initial tokens.

    Returns:
        (vowel_ids, consonant_ids): two sorted 1-D LongTensors of token ids; tokens in neither are left out.

    Example:
        >>> vowel_ids, consonant_ids = article_token_classes(tokenizer)
        >>> tokenizer.convert_tokens_to_ids("Ġhour") in set(vowel_ids.tolist())
        True
    """
    tokens = _vocab_tokens(tokenizer)
    marker = _space_marker(tokens)
    vowel, consonant = [], []
    for i, tok in enumerate(tokens):
        letters = _word_letters(tok, marker)
        if letters:
            (vowel if classify_word_start(letters) == "vowel" else consonant).append(i)
    return torch.tensor(vowel, dtype=torch.long), torch.tensor(consonant, dtype=torch.long)


def article_token_ids(tokenizer):
    """Returns {token id: "a" | "an"} for the word-initial article tokens the vocabulary has."""
    tokens = _vocab_tokens(tokenizer)
    marker = _space_marker(tokens)
    ids = {}
    for article, spellings in ARTICLES.items():
        for spelling in spellings:
            i = tokenizer.convert_tokens_to_ids(marker + spelling)
            if isinstance(i, int) and 0 <= i < len(tokens) and tokens[i] == marker + spelling:
                ids[i] = article
    if "a" not in ids.values() or "an" not in ids.values():
        raise ValueError(f"expected single tokens for {marker}a and {marker}an in the vocabulary, found {ids}")
    return ids


def probe_unsupported(tokenizer) -> str | None:
    """Why `tokenizer` cannot take the probe (no word-initial " a" and " an" tokens), or None when it can."""
    try:
        article_token_ids(tokenizer)
    except ValueError as e:
        return str(e)
    return None


def builtin_prefixes():
    """Returns the built-in context prefixes (each is probed with " a" and with " an")."""
    text = resources.files("leanfit.train").joinpath("data", "article_prefixes.json").read_text(encoding="utf-8")
    return json.loads(text)["prefixes"]


def builtin_contexts():
    """Returns the built-in contexts: each prefix followed by " a" and by " an"."""
    return [p + end for p in builtin_prefixes() for end in (" a", " an")]


def heldout_contexts(blocks, tokenizer, max_per_article=100, min_context=8):
    """Finds contexts in token blocks wherever an article token is followed by a classed word-initial token.

    Args:
        blocks: LongTensor (n, T) of token ids, e.g. the validation split.
        tokenizer: the blocks' tokenizer.
        max_per_article: keep at most this many contexts per article, spread evenly over the hits.
        min_context: skip articles with fewer tokens than this before them in their block.

    Returns:
        A list of token-id lists, each ending in an article token.
    """
    if blocks.dim() != 2:
        raise ValueError(f"expected blocks of shape (n, T), got {tuple(blocks.shape)}")
    articles = article_token_ids(tokenizer)
    vowel_ids, consonant_ids = article_token_classes(tokenizer)
    classed = torch.zeros(max(len(tokenizer), int(blocks.max()) + 1), dtype=torch.bool)
    classed[vowel_ids] = True
    classed[consonant_ids] = True
    is_article = torch.zeros_like(classed)
    is_article[list(articles)] = True
    hits = {"a": [], "an": []}
    cur, nxt = blocks[:, :-1], blocks[:, 1:]
    rows, cols = torch.nonzero(is_article[cur] & classed[nxt], as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if c >= min_context:
            hits[articles[blocks[r, c].item()]].append(blocks[r, : c + 1].tolist())
    contexts = []
    for found in hits.values():
        if len(found) > max_per_article:
            step = len(found) / max_per_article
            found = [found[int(k * step)] for k in range(max_per_article)]
        contexts += found
    return contexts


@torch.no_grad()
def _last_token_probs(model, contexts, batch_size):
    device = next(model.parameters()).device
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    probs = []
    for start in range(0, len(order), batch_size):
        chunk = [contexts[i] for i in order[start : start + batch_size]]
        lengths = torch.tensor([len(c) for c in chunk])
        ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
        for row, c in enumerate(chunk):
            ids[row, : len(c)] = torch.tensor(c)
        logits = model(input_ids=ids.to(device)).logits  # (B, T, V)
        last = logits[torch.arange(len(chunk), device=device), (lengths - 1).to(device)]
        probs.append(last.float().softmax(-1).cpu())
    return torch.cat(probs)[torch.tensor(order).argsort()]


def article_probe(model, tokenizer, contexts=None, batch_size=8):
    """Scores a model on the "a"/"an" probe (rule and metrics in the module doc).

    Args:
        model: a causal LM returning `.logits` (B, T, V).
        tokenizer: its tokenizer.
        contexts: strings or token-id lists that end in an article token; None uses `builtin_contexts()`.
        batch_size: contexts per forward pass, grouped by length and right-padded (causal attention never
            lets a real position see the padding after it).

    Returns:
        {"n", "accuracy", "balanced_accuracy", "a": {...}, "an": {...}}, where each article has
        "n", "accuracy", "mean_mass_correct", "mean_share_correct".

    Example:
        >>> article_probe(model, tokenizer)["balanced_accuracy"]
        0.93
    """
    contexts = builtin_contexts() if contexts is None else contexts
    if not contexts:
        raise ValueError("expected at least one context ending in an article, got none")
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] if isinstance(c, str) else list(c) for c in contexts]
    articles = article_token_ids(tokenizer)
    for c, i in zip(contexts, ids):
        if not i or i[-1] not in articles:
            raise ValueError(f"expected each context to end in the article token ' a' or ' an', got {c!r}")
    vowel_ids, consonant_ids = article_token_classes(tokenizer)
    was_training = model.training
    model.eval()
    probs = _last_token_probs(model, ids, batch_size)  # (N, V)
    model.train(was_training)
    vowel = probs[:, vowel_ids].sum(-1)
    consonant = probs[:, consonant_ids].sum(-1)
    is_an = torch.tensor([articles[i[-1]] == "an" for i in ids])
    correct = torch.where(is_an, vowel, consonant)
    wrong = torch.where(is_an, consonant, vowel)
    right = correct > wrong
    share = correct / (correct + wrong).clamp_min(1e-30)
    result = {"n": len(ids)}
    for name, mask in (("a", ~is_an), ("an", is_an)):
        n = int(mask.sum())
        result[name] = {
            "n": n,
            "accuracy": right[mask].float().mean().item() if n else None,
            "mean_mass_correct": correct[mask].mean().item() if n else None,
            "mean_share_correct": share[mask].mean().item() if n else None,
        }
    result["accuracy"] = right.float().mean().item()
    both = result["a"]["n"] and result["an"]["n"]
    result["balanced_accuracy"] = (result["a"]["accuracy"] + result["an"]["accuracy"]) / 2 if both else None
    return result
