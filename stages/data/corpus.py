"""Build the corpus (stage ``corpus``, entry point stages/corpus.py): the paper's three data
kinds, generated or ingested, into data/corpus.

``corpus.source: synthetic`` (default) writes documents about the seeded long-tail world of
stages/data/world.py (stages/data/synthetic.py) as the canonical corpus of
stages/data/corpus_format.py, and ``report.json`` says per kind how many samples were written and
the summed entropy floor of their text. ``corpus.source: files`` lists real data where it lies
and copies nothing: ``report.json`` names each input file with its size and version tag and the
checks its samples must pass, which is what the next stages read (``ingest.corpus_parts``); the
shards stage checks and counts every sample as it reads it (stages/data/ingest.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages.common.stage import fresh_dir, run_per_kind
from stages.data.corpus_format import CorpusWriter, write_json
from stages.data.ingest import list_inputs
from stages.data.kinds import KINDS
from stages.data.synthetic import generate
from stages.params import Params

log = logging.getLogger(__name__)


def synthesize_kind(kind: str, params: Params, out: Path) -> dict[str, Any]:
    w = params.corpus.synthetic
    n = {"caption": w.n_caption, "interleaved": w.n_interleaved, "text": w.n_text}[kind]
    entropy = blind = images = 0.0
    with CorpusWriter(out, kind, params.corpus.samples_per_file) as writer:
        for doc in tqdm(
            generate(kind, w, params.seed),
            total=n,
            desc=f"corpus {kind}",
            unit="doc",
            mininterval=2,
        ):
            writer.write(doc)
            entropy += doc.meta["entropy_nats"]
            blind += doc.meta["entropy_nats_blind"]
            images += doc.n_images
    files = [str(Path(f).relative_to(out)) for f in writer.files]
    return dict(
        outputs=files,
        read=n,
        kept=n,
        bad={},
        bad_fraction=0.0,
        entropy_nats=entropy,
        entropy_nats_blind=blind,
        images=int(images),
    )


def build_corpus(params: Params, out: Path, workers: int | None = None) -> dict[str, Any]:
    """Write the corpus and return its report (also written to ``out/report.json``)."""
    fresh_dir(out)
    if params.corpus.source == "synthetic":
        results = run_per_kind(synthesize_kind, [(k, params, out) for k in KINDS], workers)
        report = {
            "source": "synthetic",
            "seed": params.seed,
            "kinds": dict(zip(KINDS, results, strict=True)),
        }
    else:
        report = list_inputs(params.corpus.files)
    write_json(out / "report.json", report)
    return report
