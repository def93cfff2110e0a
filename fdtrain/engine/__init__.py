"""The training engine: ``fdtrain.engine.trainer.train(cfg) -> exit code``.

  trainer.py     the loop (Trainer.fit -> train_step) over the components below, step boundaries,
                 the final report
  accel.py       the Accelerator: device, DDP, mixed precision, accumulation, DeepSpeed on CPU/GPU
  ranks.py       what the ranks agree on: stop/skip flags, errors, BatchNorm stats, final weights
  optim.py       Adam (coupled wd) / AdamW; warmup + hold_step | cosine | constant, per optimizer step;
                 the device-side skip of a non-finite step (grad norm, BatchNorm snapshot)
  checkpoint.py  atomic checkpoints of the run's components, last K + best, resume; the one writer
                 and reader of model.pt (loadable with plain torch)
  signals.py     SIGTERM/SIGUSR1 -> checkpoint at the next step boundary -> exit 75
  tblog.py       TensorBoard (rank 0), the progress bar / plain log lines, and the step-metrics
                 window they show (device-side sums between logging points)
  selection.py   evaluation during training: the evaluation loaders, model selection ("best")
  evaluate.py    distributed evaluation and its metrics, `fdtrain evaluate`
  predict.py     `fdtrain predict`: images and videos -> one score each
  commands.py    CLI arguments of train / evaluate / predict (no heavy imports)

Nothing heavy is imported here, so ``fdtrain --help`` stays instant.
"""
