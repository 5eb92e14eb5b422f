"""Process groups and communication wrappers; the only place a process group is created."""
