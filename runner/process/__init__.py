"""Process supervision: the supervisor, its worker processes and what they share (worker pool, links for
metrics and reloads, the private run directory, the usable CPU count). The request path is elsewhere in
``runner``; a single-process runner never imports this package.
"""
