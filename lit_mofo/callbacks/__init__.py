"""Lightning callbacks: MoFO as a callback, Half Fine-Tuning, forgetting evaluation and parameter drift."""
