"""Deterministic synthetic person-retrieval data written in the real on-disk formats.

The generator draws pedestrian-like figures with PIL. Every identity is a fixed
combination of attributes (gender and build, hair, hat, top, bottom, shoes,
bag); every image of it varies pose, facing, scale, position, background
clutter, lighting, blur and noise. Captions verbalise the attributes with many
templates and synonyms. An optional, configurable share of captions is
corrupted the way MLLM captions go wrong -- a wrong colour or item, or an
irrelevant phrase -- and every corruption is recorded, so one can check
whether GASS scores find the noise.

Outputs (see :func:`generate`)::

    <out>/CUHK-PEDES/imgs/<split>/<id>_<k>.jpg   + reid_raw.json
    <out>/WebPerson/images/<dddd>/<index>.jpg   + annotations.json, annotations.jsonl,
                                                  shards/webperson-000000.tar ...
    <out>/meta.json, README.txt                 parameters and counts
    <out>/.gadms-synthetic                      marks the folder as the generator's (settings)
    <out>/attributes.json                       true attributes per identity / image
    <out>/noise_report.json                     which captions were corrupted and how

WebPerson annotation keys are image paths relative to ``WebPerson/images/``;
the webdataset key of a sample is that path without its extension.

Determinism: every random draw comes from a ``random.Random`` (or a numpy
generator seeded from it) whose seed is derived with SHA-256 from the global
seed plus the names and indices of the thing being drawn, so the bytes written
do not depend on worker count, scheduling, time or hash randomisati

Modules:

* :mod:`~datasets.synthetic.vocabulary`: attribute values, colour words, weights, seeds.
* :mod:`~datasets.synthetic.attributes`: :class:`PersonAttributes`, :func:`sample_identities`.
* :mod:`~datasets.synthetic.drawing`, :mod:`~datasets.synthetic.figure`,
  :mod:`~datasets.synthetic.rendering`: images (:func:`render_person`).
* :mod:`~datasets.synthetic.verbaliser`, :mod:`~datasets.synthetic.templates`,
  :mod:`~datasets.synthetic.captions`: captions (:func:`describe`, :func:`caption_pair`).
* :mod:`~datasets.synthetic.noise`: caption corruption with the words it changes.
* :mod:`~datasets.synthetic.config`: :class:`SyntheticConfig`.
* :mod:`~datasets.synthetic.writers`, :mod:`~datasets.synthetic.folders`: file formats,
  output-folder safety.
* :mod:`~datasets.synthetic.corpora`, :mod:`~datasets.synthetic.side_files`,
  :mod:`~datasets.synthetic.generation`: :func:`generate`.
* :mod:`~datasets.synthetic.generic`: the in-memory generic pretraining corpus.
"""

from __future__ import annotations

from datasets.synthetic.attributes import DESCRIBED_FIELDS, PersonAttributes, sample_identities
from datasets.synthetic.captions import caption_pair, describe
from datasets.synthetic.config import BENCHMARK_DIR, GENERATOR_VERSION, WEBPERSON_DIR, SyntheticConfig
from datasets.synthetic.drawing import RGB
from datasets.synthetic.folders import MARKER, OutputExistsError, check_claimable, claim_folder
from datasets.synthetic.generation import generate
from datasets.synthetic.generic import GENERIC_STREAM, generic_caption, generic_corpus
from datasets.synthetic.noise import NOISE_KINDS
from datasets.synthetic.rendering import contact_sheet, render_person
from datasets.synthetic.templates import TEMPLATES
from datasets.synthetic.vocabulary import (
    BAGS,
    BOTTOM_TYPES,
    BUILDS,
    GENDERS,
    HAIR_PALETTE,
    HAIR_STYLES,
    HATS,
    PALETTE,
    SKIN_TONES,
    TOP_TYPES,
    tokenize_caption,
)
from datasets.synthetic.writers import write_shards

__all__ = [
    "BAGS", "BENCHMARK_DIR", "BOTTOM_TYPES", "BUILDS", "DESCRIBED_FIELDS", "GENDERS", "GENERATOR_VERSION",
    "GENERIC_STREAM", "HAIR_PALETTE", "HAIR_STYLES", "HATS", "MARKER", "NOISE_KINDS", "PALETTE", "RGB",
    "SKIN_TONES", "TEMPLATES", "TOP_TYPES", "WEBPERSON_DIR", "OutputExistsError", "PersonAttributes",
    "SyntheticConfig", "caption_pair", "check_claimable", "claim_folder", "contact_sheet", "describe", "generate",
    "generic_caption", "generic_corpus", "render_person", "sample_identities", "tokenize_caption", "write_shards",
]
