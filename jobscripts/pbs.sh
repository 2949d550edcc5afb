#!/bin/bash
@DIRECTIVES@
#
# hpc-serverless program job @JOB_ID@ (its record: @JOB_DIR@/record.json)

# what the job creates (its log, the program's files) is private, whatever the umask
umask 0077
# output goes live to the shared filesystem (PBS copies -o files back only at the end)
exec >> @JOB_DIR@/output.log 2>&1

# site setup
@SETUP@

# environment
@ENVIRONMENT@

cd @WORKDIR@ || exit 1
# arguments: @JOB_DIR@/arguments (get_arguments()); result: @JOB_DIR@/result (save_result())
@COMMAND@
