"""The API tier: a language model with its SAEs behind one object (`Scope`), steering, the one control mechanism,
the feature store, feature hits on labelled text, behaviour metrics, fine-tuning glue, and the evaluation and quality
metrics (`evaluate`, `probing`, `absorption`, `quality`). The API imports only the core."""
