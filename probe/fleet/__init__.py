"""A vantage point's link to the fleet: the forwarder that uploads its spool to the central
store and the uplink that carries that upload through a tunnel."""
