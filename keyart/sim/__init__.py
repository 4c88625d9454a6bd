"""The world simulator: a seeded catalog, members, viewing history and ground truth.

``keyart world`` (:mod:`keyart.sim.cli_world`) writes the world into a lake;
``keyart traffic`` (:mod:`keyart.sim.cli_traffic`) simulates one day of visits against
a chooser. Benchmarks use :class:`keyart.sim.world.World` directly: ``World.visits``,
``World.oracle_choice``, ``World.expected_value``. See docs/simulator.md.
"""
