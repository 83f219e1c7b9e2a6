// The MPI_Comm behind an MpiCommunicator; only MPI-aware files of dist include this.
#pragma once
#include <mpi.h>

namespace lockstep::dist {

struct MpiHandle {
  MPI_Comm comm = MPI_COMM_NULL;
};

// Throws lockstep::Error naming the call and MPI's message when rc != MPI_SUCCESS.
void mpi_check(int rc, const char* what);

}  // namespace lockstep::dist
