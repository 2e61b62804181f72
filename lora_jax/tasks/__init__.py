"""Tasks: datasets, losses and metrics. Default task: `code_search` (stdlib docstring -> code).

Modules: `code_search` (dataset build/cache/split, tokenisation, batch iterator),
`stdlib_functions` (the `ast` extractor it uses), `retrieval` (pooling, InfoNCE loss, R@k/MRR).
"""
