"""`actdb serve`: a read-only web explorer over a store (neurons, their twins in other seeds, their life across
checkpoints), rendered on the server with Jinja2 and plain SVG charts."""
