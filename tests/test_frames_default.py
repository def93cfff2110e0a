"""`fdtrain predict` samples as many frames per video as `fdtrain shards make` stores (one constant)."""
from __future__ import annotations

import argparse

from fdtrain.data.prep.commands import default_frames
from fdtrain.data.prep.ingest import CropOptions
from fdtrain.data.prep.video import FRAMES_PER_VIDEO
from fdtrain.engine.commands import add_predict_arguments
from fdtrain.engine.predict import PredictOptions


def test_predict_and_shards_make_take_the_same_frames_per_video():
    p = argparse.ArgumentParser()
    add_predict_arguments(p)
    cli = p.parse_args(["--checkpoint", "runs/x", "clip.mp4"]).frames
    assert FRAMES_PER_VIDEO == 32
    assert cli == PredictOptions().frames == CropOptions().frames == default_frames("ffpp") == FRAMES_PER_VIDEO
    assert default_frames("synth") is None  # the synthetic benchmark stores all of its few frames
