// Process-wide llama.cpp state: backend initialisation and logging.
#pragma once

namespace llama_steer {

// Initialise llama.cpp's backends once per process and install our log
// filter. Safe to call from every constructor.
void runtime_init();

// Log threshold: 0 debug, 1 info, 2 warn, 3 error, 4 none. Read from
// LLAMA_STEER_LOG (debug|info|warn|error|none) at start, default warn.
void set_log_level(int level);
int log_level();

}  // namespace llama_steer
