"""What every layer shares: user-facing errors, video and image I/O, atomic writes, hub access and the
cache folders. Imports nothing else of the project; see DESIGN.md for the layers."""
