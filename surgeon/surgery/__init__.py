"""Graph surgery: trace a model, find sites, rewrite the graph, verify the result.

Nothing here knows about particular attention types; modules arrive built from a site's shape.
"""
