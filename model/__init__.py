"""Retrieval model, CLIP backbone, tokenizer, GASS, heads and objectives."""

from model.build import GADMS, TrainOutput, build_model

__all__ = ["GADMS", "TrainOutput", "build_model"]
