"""The languages Whisper knows, as ISO codes (the `<|xx|>` tokens of the tokenizer).

Kept here, not imported from transformers, so the control plane (gateway, CRD
schema) does not depend on the ML stack; a test checks the list against the
tokenizer's own table.
"""

# Scripts written without spaces between words: each character may be a word, and texts join
# without a separator.
NO_SPACE_LANGUAGES = frozenset({"zh", "yue", "ja", "th", "lo", "km", "my", "bo"})

WHISPER_LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian",
    "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer",
    "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}

_BY_NAME = {name: code for code, name in WHISPER_LANGUAGES.items()}


def join_texts(texts: list[str], language: str | None) -> str:
    """Whisper's texts as one: as written when they carry their own leading spaces (" Hello"),
    else one space between stripped ones; no separator in scripts written without spaces."""
    if language in NO_SPACE_LANGUAGES or all(t[:1].isspace() for t in texts[1:]):
        return "".join(texts)
    return " ".join(t.strip() for t in texts if t.strip())


def with_leading_space(text: str, language: str | None) -> str:
    """Whisper's convention for a segment or word: " Hello" (not in scripts without spaces)."""
    if language in NO_SPACE_LANGUAGES or text[:1].isspace():
        return text
    return " " + text


def normalize_language(value: str | None) -> str | None:
    """Map a code ("en"), a name ("English") or the original API's "None" to a code.

    Returns None for "detect"; raises ValueError for anything Whisper cannot do.
    """
    if value is None:
        return None
    cleaned = value.strip().lower()
    if cleaned in ("", "none", "auto"):
        return None
    if cleaned in WHISPER_LANGUAGES:
        return cleaned
    if cleaned in _BY_NAME:
        return _BY_NAME[cleaned]
    raise ValueError(f"unsupported language {value!r}: use an ISO code Whisper knows, e.g. 'en', or leave empty to detect")
