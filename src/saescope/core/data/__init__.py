"""Text sources and token packing."""

from saescope.core.data.packing import batches, token_chunks
from saescope.core.data.sources import DEFAULT_CORPUS, default_corpus_path, is_eval_document, iter_texts

__all__ = ["DEFAULT_CORPUS", "batches", "default_corpus_path", "is_eval_document", "iter_texts", "token_chunks"]
