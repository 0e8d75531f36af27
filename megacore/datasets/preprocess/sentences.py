"""The sentence splitter of ``--split-sentences``: NLTK punkt, never downloaded."""

from __future__ import annotations


def build_sentence_splitter(lang: str, keep_newlines: bool):
    """NLTK punkt for ``lang`` if installed locally, else punkt's untrained defaults.

    With ``keep_newlines`` the whitespace after a sentence end stays on the sentence, so
    joining the sentences gives back the text with its line breaks.
    """
    from nltk.tokenize import punkt

    class WhitespaceKeepingLanguageVars(punkt.PunktLanguageVars):
        # punkt's default pattern consumes the whitespace after a sentence end; matching
        # it inside the sentence (\s*) and looking ahead only at the next token keeps it.
        _period_context_fmt = r"""
            %(SentEndChars)s             # a potential sentence ending
            \s*                          # whitespace stays with the sentence
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next token
            ))"""

    lang_vars = WhitespaceKeepingLanguageVars() if keep_newlines else punkt.PunktLanguageVars()
    splitter = punkt.PunktSentenceTokenizer(lang_vars=lang_vars)
    try:
        # Parameters trained for `lang`, only if installed locally (never downloaded).
        splitter._params = punkt.PunktTokenizer(lang)._params
    except (LookupError, OSError, ValueError):
        pass
    return splitter
