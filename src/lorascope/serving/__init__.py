"""Serving cost of fine-tuned models: full fine-tuning vs LoRA merged vs LoRA kept separate vs
several adapters on one base (switched per request, or multi: one batch holding examples of
several adapters), on PEFT in-process and on vLLM servers (docs/serving.md). Classifiers answer
one forward pass a request; decoders that generate answer a fixed number of streamed tokens.

inputs (examples, the request stream, padded batches), strategies (one registered object per
way of serving), checks (correctness before timing), load (the closed-loop load generator and
its turns), grid (the cells, their requests, overheads and tables), peft_engine and
vllm_engine (+ vllm_server) (the engines), memory (PEFT's, one fresh process per strategy),
benchmark (the entry point that runs them in order). Generation: streaming (timing a streamed
request), generation_grid (its table), peft_generation and vllm_generation (the engines' requests
and checks), generation_benchmark (its entry point)."""
