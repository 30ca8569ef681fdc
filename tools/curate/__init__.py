"""WebPerson-style data curation pipeline (see docs/curation.md).

Five resumable stages, each reading the previous stage's output folder:

1. ``ingest``: web image-text pairs (JSONL / parquet) or local folders -> ``images/``;
2. ``filter``: person detection + pose rules (METHOD §9) -> person crops;
3. ``templates``: benchmark captions -> attribute templates (LLM, embeddings, k-means);
4. ``caption``: two template-guided VLM captions per crop;
5. ``export``: the WebPerson JSON / JSONL / tar-shard formats + a statistics report.

Run ``python -m tools.curate <stage> --help`` from the repository root.
"""

STAGES = ("ingest", "filter", "templates", "caption", "export")
