"""Retrieval model, CLIP backbone, tokenizer, GASS, heads and objectives."""

from model.build import GADMS, build_model

__all__ = ["GADMS", "build_model"]
