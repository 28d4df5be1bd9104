"""Inference: turning a checkpoint into text.

sampling.py  the one sampler (temperature, top-k, top-p, repetition penalty)
generate.py  the book's loop with a KV cache: `generate`, `generate_text`
decode.py    `DecodeStep`: the model's arithmetic for one token, without module-call overhead
engine.py    `Engine`: continuous batching, streaming, stop ids and strings, cancellation
requests.py  what a request is: `SamplingParams`, `Completion`, `Event`, `Request`
scoring.py   token log-probabilities: of prompts (a forward pass), of drawn tokens
chat.py      messages → prompt ids (a chat template or the Alpaca format), `ChatSession`
weights.py   CPU weight formats for decoding: packed fp32, fp16, int8
kernels.py   our C decode kernels: int8/fp16 matrix-vector, one-query attention, a block in one call
"""
