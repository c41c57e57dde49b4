#include "llama.h"
#include <cstdio>
int main() { llama_backend_init(); printf("%s\n", llama_print_system_info()); return 0; }
