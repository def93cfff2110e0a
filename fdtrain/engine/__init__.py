"""The training engine: ``fdtrain.engine.trainer.train(cfg) -> exit code``.

  trainer.py     the loop (Trainer.fit -> train_step), step boundaries, final evaluation
  accel.py       the Accelerator: device, DDP, mixed precision, accumulation, DeepSpeed on CPU/GPU
  optim.py       Adam (coupled wd) / AdamW; warmup + hold_step | cosine | constant, per optimizer step
  checkpoint.py  atomic checkpoints (model.pt loadable with plain torch), last K + best, resume
  signals.py     SIGTERM/SIGUSR1 -> checkpoint at the next step boundary -> exit 75
  tblog.py       TensorBoard (rank 0) and the progress bar / plain log lines
  evaluate.py    distributed evaluation, model selection, `fdtrain evaluate`
  predict.py     `fdtrain predict`: images and videos -> one score each
  commands.py    CLI arguments of train / evaluate / predict (no heavy imports)

Nothing heavy is imported here, so ``fdtrain --help`` stays instant.
"""
