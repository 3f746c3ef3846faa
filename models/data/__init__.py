"""Package data: ``corpus.txt``, the small embedded default corpus (original text written for this project)."""
