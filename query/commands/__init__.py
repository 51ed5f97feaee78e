"""The click commands of `actdb`, one module per study or group; each command opens the store and calls one library
function."""
