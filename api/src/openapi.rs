//! `GET /openapi.json`: an OpenAPI 3.0 description of what this server accepts and answers,
//! written to match the validation in [`crate::schema`] (schemathesis checks the two against
//! each other in the tests). Constraints the schema cannot state (the prompt must fit the
//! model's context; `top_logprobs` needs `logprobs`) are 400s documented in the descriptions.

use serde_json::{Value, json};

use crate::schema::{MAX_STOP_CHARS, MAX_STOPS, MAX_TOP_LOGPROBS};

fn error_responses(codes: &[&str]) -> serde_json::Map<String, Value> {
    let describe = |c: &str| match c {
        "400" => {
            "The request is invalid (malformed JSON, a value out of range, a prompt longer than the context)."
        }
        "401" => "An API key is required: `Authorization: Bearer KEY`.",
        "404" => "No such model or path.",
        "405" => "Method not allowed.",
        "413" => "The request body is over the size limit.",
        "429" => "The admission queue is full; see `Retry-After`.",
        "503" => "No route covers the model, or no token came within the deadlines; see `Retry-After`.",
        _ => "Error.",
    };
    codes
        .iter()
        .map(|&c| {
            (
                c.to_owned(),
                json!({"description": describe(c),
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
            )
        })
        .collect()
}

fn sampling_properties(model: &str, max_n: usize) -> Value {
    json!({
        "model": {"type": "string", "enum": [model, null], "nullable": true, "description": "The served model (optional)."},
        "max_tokens": {"type": "integer", "minimum": 1, "nullable": true,
                       "description": "Most tokens to generate (default: the rest of the context)."},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": true,
                                  "description": "Alias of max_tokens; wins when both are given."},
        "temperature": {"type": "number", "minimum": 0, "maximum": 100, "nullable": true},
        "top_p": {"type": "number", "exclusiveMinimum": true, "minimum": 0, "maximum": 1, "nullable": true},
        "top_k": {"type": "integer", "minimum": -1, "nullable": true,
                  "description": "-1 or 0 disables top-k."},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1, "nullable": true},
        "seed": {"type": "integer", "nullable": true,
                 "description": "Fixes the sampled tokens (a random seed when absent)."},
        "stop": {"nullable": true, "oneOf": [
            {"type": "string", "maxLength": MAX_STOP_CHARS},
            {"type": "array", "maxItems": MAX_STOPS, "items": {"type": "string", "maxLength": MAX_STOP_CHARS}}]},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": true},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": true},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": true, "minimum": 0, "nullable": true},
        "n": {"type": "integer", "minimum": 1, "maximum": max_n, "nullable": true},
        "stream": {"type": "boolean", "nullable": true},
        "stream_options": {"type": "object", "nullable": true,
                           "properties": {"include_usage": {"type": "boolean", "nullable": true}}},
        "ignore_eos": {"type": "boolean", "nullable": true,
                       "description": "Generate past the end of sequence, up to max_tokens (for benchmarks)."},
        "user": {"type": "string", "nullable": true},
        "guided_json": {"type": "object", "nullable": true, "description": "vLLM's: a JSON schema the output follows."},
        "guided_regex": {"type": "string", "nullable": true, "description": "vLLM's: a regular expression the output matches."},
        "guided_choice": {"type": "array", "nullable": true, "minItems": 1, "items": {"type": "string"},
                          "description": "vLLM's: the output is one of these strings."},
        "guided_grammar": {"type": "string", "nullable": true,
                           "description": "vLLM's: a grammar in llguidance's Lark dialect."},
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// The document, for a server of `model` that allows at most `max_n` choices.
pub(crate) fn document(model: &str, max_n: usize) -> Value {
    let chat_props = merge(
        sampling_properties(model, max_n),
        json!({
            "messages": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Message"}},
            "logprobs": {"type": "boolean", "nullable": true},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS, "nullable": true,
                             "description": "Needs logprobs: true."},
            "response_format": {"nullable": true, "description": "Structured output, enforced by constrained decoding.",
                "oneOf": [
                    {"type": "object", "required": ["type"], "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}}},
                    {"type": "object", "required": ["type", "json_schema"], "properties": {
                        "type": {"type": "string", "enum": ["json_schema"]},
                        "json_schema": {"type": "object", "required": ["name"], "properties": {
                            "name": {"type": "string"}, "schema": {"type": "object"}, "strict": {"type": "boolean", "nullable": true}}}}}]},
            "tools": {"type": "array", "nullable": true, "items": {"type": "object", "required": ["type", "function"],
                "properties": {"type": {"type": "string", "enum": ["function"]},
                    "function": {"type": "object", "required": ["name"], "properties": {
                        "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
                        "description": {"type": "string"}, "parameters": {"type": "object"}}}}}},
            "tool_choice": {"nullable": true, "oneOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {"type": "object", "required": ["type", "function"], "properties": {
                    "type": {"type": "string", "enum": ["function"]},
                    "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]},
            "parallel_tool_calls": {"type": "boolean", "nullable": true},
        }),
    );
    let completion_props = merge(
        sampling_properties(model, max_n),
        json!({
            "prompt": {"description": "Text, token ids, or a list of one of either.", "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}},
                {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                {"type": "array", "minItems": 1, "maxItems": 1,
                 "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS, "nullable": true},
        }),
    );
    let json_and_sse = |schema: &str| {
        json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}},
               "text/event-stream": {"schema": {"type": "object", "required": ["data"],
                   "description": "With stream: true, one event per chunk (`data: {chunk JSON}`), then `data: [DONE]`; a failure mid-stream is one `data: {error envelope}` event.",
                   "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}})
    };
    let post = |summary: &str, body: &str, response: &str| {
        let mut responses = error_responses(&["400", "401", "404", "413", "429", "503"]);
        responses.insert(
            "200".into(),
            json!({"description": "The completion.", "content": json_and_sse(response)}),
        );
        json!({"post": {
            "summary": summary,
            "requestBody": {"required": true,
                            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{body}")}}}},
            "responses": responses,
        }})
    };
    let model_schema = json!({"type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                       "created": {"type": "integer"}, "owned_by": {"type": "string"}}});
    let usage = json!({"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                       "total_tokens": {"type": "integer"}}});
    let finish = json!({"type": "string", "enum": ["stop", "length", "tool_calls"]});
    let logprobs = json!({"type": "object", "nullable": true});
    let mut models_responses = error_responses(&["401"]);
    models_responses.insert(
        "200".into(),
        json!({"description": "The served model.", "content": {"application/json": {"schema": {
            "type": "object", "required": ["object", "data"],
            "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": model_schema}}}}}}),
    );
    let mut model_responses = error_responses(&["401", "404"]);
    model_responses.insert(
        "200".into(),
        json!({"description": "The model.", "content": {"application/json": {"schema": model_schema}}}),
    );
    let mut health_responses = error_responses(&["503"]);
    health_responses.insert(
        "200".into(),
        json!({"description": "A full route exists.", "content": {"application/json": {"schema": {
            "type": "object", "required": ["status"], "properties": {"status": {"type": "string"},
            "route_hops": {"type": "integer"}}}}}}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {"title": "shoal", "version": env!("CARGO_PKG_VERSION"),
                 "description": "OpenAI-compatible API of a shoal node: peer-to-peer LLM inference."},
        "paths": {
            "/v1/chat/completions": post("Chat completion", "ChatRequest", "ChatCompletion"),
            "/v1/completions": post("Text completion", "CompletionRequest", "Completion"),
            "/v1/models": {"get": {"summary": "Models served", "responses": models_responses}},
            "/v1/models/{model}": {"get": {"summary": "One model",
                "parameters": [{"name": "model", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": model_responses}},
            "/health": {"get": {"summary": "200 once a full route exists, else 503 with the reason",
                                "responses": health_responses}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Metrics.",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI.",
                "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "param", "code"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                   "param": {"type": "string", "nullable": true},
                                   "code": {"type": "string", "nullable": true}}}}},
                "Message": {"type": "object", "required": ["role"], "properties": {
                    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
                    "tool_call_id": {"type": "string", "description": "A tool message's call."},
                    "tool_calls": {"type": "array", "nullable": true, "items": {"type": "object",
                        "required": ["id", "type", "function"], "properties": {
                            "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
                            "function": {"type": "object", "required": ["name", "arguments"], "properties": {
                                "name": {"type": "string"}, "arguments": {"type": "string"}}}}}},
                    "content": {"nullable": true, "oneOf": [
                        {"type": "string"},
                        {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                            "properties": {"type": {"type": "string", "enum": ["text"]},
                                           "text": {"type": "string"}}}}]}}},
                "ChatRequest": {"type": "object", "required": ["messages"], "properties": chat_props},
                "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": completion_props},
                "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                    "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]},
                        "created": {"type": "integer"}, "model": {"type": "string"}, "usage": usage,
                        "choices": {"type": "array", "items": {"type": "object",
                            "required": ["index", "message", "finish_reason"],
                            "properties": {"index": {"type": "integer"}, "finish_reason": finish, "logprobs": logprobs,
                                "message": {"type": "object", "required": ["role", "content"],
                                    "properties": {"role": {"type": "string", "enum": ["assistant"]},
                                                   "content": {"type": "string", "nullable": true},
                                                   "tool_calls": {"type": "array", "items": {"type": "object"}}}}}}}}},
                "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                    "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["text_completion"]},
                        "created": {"type": "integer"}, "model": {"type": "string"}, "usage": usage,
                        "choices": {"type": "array", "items": {"type": "object",
                            "required": ["index", "text", "finish_reason"],
                            "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                           "finish_reason": finish, "logprobs": logprobs}}}}},
            },
        },
    })
}
