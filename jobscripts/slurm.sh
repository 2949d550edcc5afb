#!/bin/bash
@DIRECTIVES@
#
# hpc-serverless program job @JOB_ID@ (its record: @JOB_DIR@/record.json)

# site setup
@SETUP@

# environment
@ENVIRONMENT@

cd @WORKDIR@ || exit 1
# arguments: @JOB_DIR@/arguments (get_arguments()); result: @JOB_DIR@/result (save_result())
@COMMAND@
