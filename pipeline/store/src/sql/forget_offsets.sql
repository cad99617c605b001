DELETE FROM sink_offsets WHERE consumer = $1
