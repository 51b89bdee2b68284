"""Emergency load shedding: the controller and its phases."""
