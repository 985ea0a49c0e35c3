"""Both steps of `svd-animate ui` from a script: python examples/page_api.py URL USER:PASSWORD REFERENCE VIDEO"""
import sys

from gradio_client import Client, handle_file

url, login, reference, video = sys.argv[1:]
client = Client(url, auth=tuple(login.split(":", 1)))  # a login of the server's --auth / --auth-file

# Step 1: the driving poses aligned to the reference: a preview video and poses.npz.
preview, poses = client.predict(handle_file(reference), handle_file(video), align="bones", max_frames=8,
                                api_name="/poses")
print("poses:", poses)

# Step 2: the animation. Options are named as on the page and the command line; those left out take the preset's.
result, poses = client.predict(handle_file(reference), handle_file(video), steps=4, seed=42, fast=True,
                               max_frames=8, api_name="/animate")
print("animation:", result)
