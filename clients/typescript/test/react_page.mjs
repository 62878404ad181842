// The React page of browser.mjs: `useTask` under a `TaskqlProvider`,
// rendering the task's status (and `final` once done, or the error's code).
import { createElement } from 'react';
import { createRoot } from 'react-dom/client';
import { createClient } from '../dist/index.js';
import { TaskqlProvider, useTask } from '../dist/react.js';

function Status({ id }) {
  const { task, done, error } = useTask(id);
  const text = error ? `error ${error.code}` : task ? `${task.status}${done ? ' final' : ''}` : 'loading';
  return createElement('p', { id: `status-${id}` }, text);
}

window.renderTasks = (url, token, ids) => {
  const client = createClient({ url, token });
  const root = document.createElement('div');
  document.body.append(root);
  createRoot(root).render(
    createElement(TaskqlProvider, { client }, ...ids.map((id) => createElement(Status, { id, key: id }))),
  );
};
