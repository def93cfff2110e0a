"""Offline preparation: datasets -> shards, checked (`fdtrain shards make | verify`, `fdtrain synth`).

``sources``: dataset layouts -> jobs; ``video`` / ``faces``: frames and face crops; ``ingest``: jobs ->
crops -> shards (written with ``fdtrain.data.format``); ``verify``: re-read shards; ``synth``: the
synthetic benchmark; ``commands``: their command lines. No torch here.
"""
