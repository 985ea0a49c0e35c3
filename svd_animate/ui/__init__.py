"""`svd-animate ui`: a local web page over the same library calls as the CLI.

`jobs.py` is the work behind the page (models kept loaded, job folders, cancelling) and knows nothing of
Gradio; `page.py` builds the page from the option definitions in `svd_animate/options.py`.
"""
