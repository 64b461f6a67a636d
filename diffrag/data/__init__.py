"""Local data: the data-dir setting and readers for the released file formats."""

from diffrag.data.readers import (data_dir, read_beir_corpus, read_jsonl, read_musique_corpus, read_passages,
                                    read_squad, require_file)

__all__ = ["data_dir", "read_beir_corpus", "read_jsonl", "read_musique_corpus", "read_passages", "read_squad",
           "require_file"]
