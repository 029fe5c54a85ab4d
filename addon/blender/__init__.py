"""Everything in the add-on that touches bpy (properties, operators, panels, scene building)."""
