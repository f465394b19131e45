"""Run plumbing: one training job from config to finished run (training), sweeps and DDP
children (jobs), resume, checkpoint files, loggers, progress lines and the checks at the door."""
