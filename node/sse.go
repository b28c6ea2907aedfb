package node

import (
	"encoding/json"
	"fmt"
	"net/http"
)

// sseWriter writes Server-Sent Events, flushing each one so that the client
// sees every token as it is generated. The stream (200 text/event-stream)
// starts with the first event, so that a request that fails before it still
// gets an error status; after it, errors can only be sent as events.
type sseWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	started bool
}

func (s *sseWriter) start() {
	h := s.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	s.w.WriteHeader(http.StatusOK)
	s.rc = http.NewResponseController(s.w)
	s.started = true
}

// event writes one event (name may be empty: a plain "message") whose data
// is v as JSON, and flushes it.
func (s *sseWriter) event(name string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return s.raw(name, b)
}

func (s *sseWriter) raw(name string, data []byte) error {
	if !s.started {
		s.start()
	}
	var err error
	if name != "" {
		_, err = fmt.Fprintf(s.w, "event: %s\n", name)
	}
	if err == nil {
		_, err = fmt.Fprintf(s.w, "data: %s\n\n", data)
	}
	if err == nil {
		err = s.rc.Flush()
	}
	return err
}

// done writes the final "data: [DONE]".
func (s *sseWriter) done() error { return s.raw("", []byte("[DONE]")) }

// fail sends an error after the stream started: "event: error" with the
// JSON error, as OpenAI's clients read it.
func (s *sseWriter) fail(status int, code, msg string) {
	s.event("error", apiError(status, code, msg))
}
