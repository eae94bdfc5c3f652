"""The paper's three data kinds (§2.1): image-caption pairs, interleaved image-text documents,
and text-only documents. Every stage, the loader and the schema take the names from here."""

KINDS: tuple[str, ...] = ("caption", "interleaved", "text")
# what the fits and the report are per: the average validation loss, then each kind's
TARGETS: tuple[str, ...] = ("avg", *KINDS)
