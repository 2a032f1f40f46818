"""Low-level model library: model loading and `ModelSpec` plumbing, random-weight model directories,
the bundled GPT-2 tokenizer, and the functional prefix forwards shared by training and the engine.

The bottom layer of the project: it imports no other package of ours (see docs/architecture.md)."""
