"""Device meshes, the logical -> mesh axis rule table, distributed start-up, XLA flags."""
