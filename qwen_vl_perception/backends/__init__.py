"""Where the model runs: the node's ``backend`` parameter.

- ``local``: in this process, :class:`~qwen_vl_perception.model.engine.VisionLanguageEngine`
  (transformers, bitsandbytes; the only path importing torch).
- ``openai``: an OpenAI-compatible server (vLLM, SGLang, ...), :mod:`.openai_engine`, over
  the standard library's HTTP client; no torch.

Both answer ``generate(images, instruction, max_new_tokens)`` with
:class:`~qwen_vl_perception.model.generation.Generation` objects, so the Detector, parser,
scores and messages do not depend on the backend.
"""
BACKENDS = ('local', 'openai')
