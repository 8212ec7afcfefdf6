"""Serving cost of fine-tuned classifiers: full fine-tuning vs LoRA merged vs LoRA kept
separate vs several adapters on one base (switched per request, or mixed in one batch).

inputs (request streams and batches), strategies (one registered object per way of serving),
checks (correctness before timing), timing (interleaved, synchronised timing and its tables),
memory (one fresh process per strategy), benchmark (the entry point that runs them in order)."""
